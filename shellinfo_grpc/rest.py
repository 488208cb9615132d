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
* an enum number without a spelling (a newer producer's binary) is written as
  the JSON integer; ``from_rest`` reads any int32 there as the enum number
  (``0``, the ``_UNSPECIFIED`` value, as unset); ``strict=True`` refuses a
  number that has no spelling;
* keys and enum spellings this schema version does not know are kept in the
  ``unrecognized`` field and written back, unless ``strict=True`` asks to
  reject them. An unknown key's value is kept as its canonical JSON text
  (sorted object keys, ECMAScript number form; see ``_jsonvalue``), so that
  equal values are equal texts whichever language wrote them.

This module imports neither grpc nor the SDK: it is the codec's hot path.

How it runs. ``from_rest`` and ``to_rest`` are generated at import from the
field table: one straight-line block per field instead of a loop that
dispatches on each field's kind. ``python -m shellinfo_grpc
--show-source`` prints both functions in full. The block ``from_rest`` runs
for one integer key and one enum key reads::

    v = get('jobRunId')
    if v is not None:
        if type(v) is not int or not -9223372036854775808 <= v <= 9223372036854775807:
            raise _bad_value('jobRunId', 'int', v)
        kw['job_run_id'] = v
    ...
    v = get('status')
    if v is not None:
        if type(v) is str:
            number = _by_rest_status(v)
            if number is not None:
                kw['status'] = number
            elif strict:
                raise RestDecodeError('status', f'unknown value {quote(v)} (strict mode)')
            else:
                kw['status'] = v
                odd = True
        elif v := _enum_number('status', v, strict):
            kw['status'] = v

(``_by_rest_status`` is ``dict.get`` of the spelling -> number table.) The
whole body of ``from_rest`` sits in a ``try`` that turns any exception the
record's own methods raise (a hostile mapping) into :class:`RestDecodeError`.

``to_rest`` has a fast path for the usual record: the fields set (and
non-zero) in almost every record are read, their enum spellings looked up,
and a decision tree over the presence of the other fields ends in one dict
literal per pattern (a literal costs less than one insert per key). A
non-zero value proves presence, so ``HasField`` is asked only where a value
is zero or empty, or first where the field is usually unset. It begins::

    job_run_id = msg.job_run_id
    start_time_usecs = msg.start_time_usecs
    run_type = msg.run_type
    status = msg.status
    if job_run_id and start_time_usecs and run_type and status and not include_nulls:
        try:
            run_type = _names_runType[run_type]
            status = _names_status[status]
        except KeyError:
            return _to_rest_general(msg, False)
        end_time_usecs = msg.end_time_usecs
        if end_time_usecs or _has(msg, 'end_time_usecs'):
            if _has(msg, 'error'):
    ...
                    else:
                        out = {
                            'jobRunId': job_run_id,
                            'startTimeUsecs': start_time_usecs,
                            'runType': run_type,
                            'status': status,
                        }
        if _has(msg, 'unrecognized'):
            return _with_unrecognized(out, msg.unrecognized)
        return out
    return _to_rest_general(msg, include_nulls)

(``_names_status`` is the number -> spelling table, ``_has`` is
``ProtectionShellInfo.HasField``.) Every other message (an enum number
without a spelling, a zero id, nulls asked for) takes ``_to_rest_general``,
one read or presence check and one store per field. docs/benchmarks.md has
the measurements, and why ``to_rest`` cannot go much faster through
protobuf's Python API.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as _pb
from shellinfo_grpc._jsonvalue import decode as _json_decode
from shellinfo_grpc._jsonvalue import encode as _json_canonical
from shellinfo_grpc._jsonvalue import key_name as _key_name
from shellinfo_grpc._jsonvalue import quote, type_name
from shellinfo_grpc.errors import RestDecodeError

__all__ = ["REST_KEYS", "from_rest", "from_sdk", "rest_names", "to_rest", "to_sdk"]

_Message = _pb.ProtectionShellInfo
_Unrecognized = _pb.UnrecognizedRest
_Extra = _pb.ExtraRestKey

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1

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
# Unset in most records: to_rest asks for their presence before reading them.
_USUALLY_ABSENT: Final = frozenset({"error"})
# Set, and not zero, in almost every record: the fast path of to_rest needs them.
_USUALLY_SET: Final = frozenset({"job_run_id", "start_time_usecs", "run_type", "status"})
# Usually set only where these are (a run with no end time has no end "HH:MM").
_SET_WITH: Final = {"end_time_hhmm": ("end_time_usecs", "start_time_hhmm")}
_has: Final = _Message.HasField


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
    return f"a Python {type_name(value)}"


def _int_text(value: int) -> str:
    """An integer for a message: its digits, or their number if there are many."""
    if value.bit_length() <= 128:
        return str(value)
    return f"of about {int(value.bit_length() * 0.30103) + 1} digits"


def _bad_value(key: str, kind: str, value: object) -> RestDecodeError:
    """Explain why ``value`` is not acceptable for REST key ``key``."""
    if kind == _INT:
        if type(value) is int:
            return RestDecodeError(key, f"integer {_int_text(value)} is outside the int64 range")
        return RestDecodeError(key, f"expected an integer, got {_json_type(value)}")
    if kind == _HHMM and isinstance(value, str):
        return RestDecodeError(key, f'expected "HH:MM" (00:00 to 23:59), got {quote(value)}')
    if kind == _ENUM:
        if type(value) is int:
            return RestDecodeError(key, f"enum number {_int_text(value)} is outside the int32 range")
        return RestDecodeError(key, f"expected a string or an enum number, got {_json_type(value)}")
    return RestDecodeError(key, f"expected a string, got {_json_type(value)}")


def _enum_number(key: str, value: object, strict: bool) -> int | None:
    """The enum number a JSON integer in ``status``/``runType`` stands for.

    Any int32 is accepted as the enum number, as protobuf's JSON mapping does
    and as :func:`to_rest` writes a number it has no spelling for; a known
    number reads as its value. ``0`` (the ``_UNSPECIFIED`` value, which has no
    spelling) reads as unset, the way :func:`to_rest` shows it. With
    ``strict=True`` a number without a REST spelling is refused.
    """
    if type(value) is not int or not _INT32_MIN <= value <= _INT32_MAX:
        raise _bad_value(key, _ENUM, value)
    if strict and value not in _BY_KEY[key].by_number:
        raise RestDecodeError(key, f"enum number {value} has no REST spelling (strict mode)")
    return value or None


def _unicode_error(key: str, value: object) -> RestDecodeError | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return RestDecodeError(key, "text is not valid Unicode (lone surrogate)")
    return None


def _key_repr(key: object) -> str:
    """A REST key that is not a string, shown safely in one bounded line."""
    if type(key) in (int, bool, float, type(None), tuple, bytes, frozenset):
        try:
            text = repr(key) if not (type(key) is int and key.bit_length() > 128) else f"<an integer {_int_text(key)}>"
        except Exception:  # a repr of hostile parts (in a tuple) may raise anything
            text = f"<a Python {type_name(key)}>"
    else:
        text = f"<a Python {type_name(key)}>"
    return quote(text, 60, marks=False)


def _unrecognized(data: Mapping[Any, Any], kw: dict[str, Any], strict: bool) -> None:
    """Collect what ``data`` holds that the schema does not know into ``kw``.

    Called only when the quick count in ``from_rest`` shows nulls, unknown keys
    or unknown enum spellings, so the common record never pays for it. Each
    unknown value is stored as its canonical JSON text (see ``_jsonvalue``).
    """
    spellings = {
        field.attr: kw.pop(field.attr) for field in _FIELDS if field.kind == _ENUM and type(kw.get(field.attr)) is str
    }
    extras: list[_pb.ExtraRestKey] = []
    seen: set[str] = set()
    for key, value in data.items():
        if type(key) is str and key in _BY_KEY:
            continue
        if not isinstance(key, str):
            raise RestDecodeError(_key_repr(key), "REST keys must be strings")
        if type(key) is not str:  # a str subclass: its plain text
            key = str.__str__(key)  # noqa: PLW2901
            if key in _BY_KEY:
                continue
        if strict:
            raise RestDecodeError(_key_name(key), "unknown key (strict mode rejects keys the schema does not know)")
        if key in seen:
            raise RestDecodeError(_key_name(key), "key appears twice in the record")
        seen.add(key)
        try:
            text = _json_canonical(value)
            extras.append(_Extra(key=key, json_value=text))
        except RestDecodeError as exc:
            raise RestDecodeError(_key_name(key), f"value is not representable as JSON: {exc.reason}") from None
        except ValueError:  # protobuf refused the key's text: a lone surrogate
            raise RestDecodeError(_key_name(key), "key is not valid Unicode (lone surrogate)") from None
    if spellings or extras:
        try:
            kw[_UNRECOGNIZED] = _Unrecognized(extra_keys=extras, **spellings)
        except (ValueError, TypeError):
            raise _refused(data) from None


def _unexpected(exc: Exception) -> RestDecodeError:
    """A record whose own methods failed while it was read (a hostile mapping, say)."""
    try:
        detail = quote(str(exc), 80, marks=False)
    except Exception:  # str() of a hostile exception may raise anything
        detail = "(no description)"
    return RestDecodeError(None, f"the record could not be read: {type_name(exc)}: {detail}")


# from_rest and to_rest are compiled once, at import, from the field table
# above (see the module docstring). That is what makes them an order of
# magnitude faster than protobuf's generic JSON path while checking every value
# (docs/benchmarks.md). Their source is kept in _FROM_REST_SOURCE and
# _TO_REST_SOURCE; `python -m shellinfo_grpc --show-source` prints it.


def _from_rest_source() -> str:
    lines = [
        "def from_rest(data, *, strict=False):",
        "    try:",
        "        if type(data) is not dict and not isinstance(data, Mapping):",
        "            raise RestDecodeError(None, f'expected a JSON object, got {_json_type(data)}')",
        "        get = data.get",
        "        kw = {}",
        "        odd = False",  # an unknown enum spelling was seen
    ]
    for field in _FIELDS:
        key, attr, kind = field.key, field.attr, field.kind
        lines += [f"        v = get({key!r})", "        if v is not None:"]
        if kind == _ENUM:
            lines += [
                "            if type(v) is str:",
                f"                number = _by_rest_{key}(v)",
                "                if number is not None:",
                f"                    kw[{attr!r}] = number",
                "                elif strict:",
                f"                    raise RestDecodeError({key!r}, f'unknown value {{quote(v)}} (strict mode)')",
                "                else:",
                f"                    kw[{attr!r}] = v",  # moved into `unrecognized` below
                "                    odd = True",
                f"            elif v := _enum_number({key!r}, v, strict):",
                f"                kw[{attr!r}] = v",
            ]
            continue
        if kind == _INT:
            check = f"type(v) is not int or not {_INT64_MIN} <= v <= {_INT64_MAX}"
        elif kind == _HHMM:
            check = "type(v) is not str or v not in _VALID_HHMM"
        else:
            check = "type(v) is not str"
        lines += [
            f"            if {check}:",
            f"                raise _bad_value({key!r}, {kind!r}, v)",
            f"            kw[{attr!r}] = v",
        ]
    lines += [
        # Each known key with a value put one entry in kw: if the counts differ
        # there are nulls or unknown keys, and only unknown keys need the scan.
        # (Only a plain dict's length is trusted; any other mapping is scanned.)
        "        if odd or ((len(kw) != len(data) or type(data) is not dict) and not _KNOWN_KEYS.issuperset(data)):",
        "            _unrecognized(data, kw, strict)",
        "        try:",
        "            return _Message(**kw)",
        "        except (ValueError, TypeError):",
        "            raise _refused(data) from None",
        "    except RestDecodeError:",
        "        raise",
        "    except Exception as exc:",  # the record's own methods failed (a hostile mapping)
        "        raise _unexpected(exc) from exc",
    ]
    return "\n".join(lines) + "\n"


def _to_rest_general_source() -> str:
    """Any message, any options: one read (or presence check) and one store per field."""
    lines = ["def _to_rest_general(msg, include_nulls):", "    out = {}"]
    for field in _FIELDS:
        key, attr = field.key, field.attr
        if field.kind == _ENUM:
            # The zero value (_UNSPECIFIED) has no REST spelling: it reads as
            # unset. A number without a spelling is written as the number.
            lines += [
                f"    v = msg.{attr}",
                "    if v:",
                "        try:",
                f"            out[{key!r}] = _names_{key}[v]",
                "        except KeyError:",
                f"            out[{key!r}] = v",
            ]
        elif field.attr in _USUALLY_ABSENT:
            # Asking for presence first costs less than reading an empty value.
            lines += [f"    if _has(msg, {attr!r}):", f"        out[{key!r}] = msg.{attr}"]
        else:
            lines += [f"    v = msg.{attr}", f"    if v or _has(msg, {attr!r}):", f"        out[{key!r}] = v"]
        lines += ["    elif include_nulls:", f"        out[{key!r}] = None"]
    lines += [
        f"    if _has(msg, {_UNRECOGNIZED!r}):",
        f"        return _with_unrecognized(out, msg.{_UNRECOGNIZED})",
        "    return out",
    ]
    return "\n".join(lines) + "\n"


def _read_first(attr: str, present: frozenset[str]) -> bool:
    """Whether the fast path reads a field before asking for its presence.

    A non-zero value proves presence, so for a field that is usually set a
    read alone decides; for one that is usually unset, ``HasField`` alone does.
    """
    if attr in _USUALLY_ABSENT:
        return False
    return all(other in present for other in _SET_WITH.get(attr, ()))


def _to_rest_tree(fields: tuple[_Field, ...], present: frozenset[str], depth: int) -> list[str]:
    """The fast path's decision tree over ``fields``: one leaf per presence pattern."""
    pad = "    " * depth
    if not fields:
        items = [f"{pad}    {f.key!r}: {f.attr}," for f in _FIELDS if f.attr in present]
        return [f"{pad}out = {{", *items, f"{pad}}}"]
    field, rest = fields[0], fields[1:]
    attr = field.attr
    if _read_first(attr, present):
        head = [f"{pad}{attr} = msg.{attr}", f"{pad}if {attr} or _has(msg, {attr!r}):"]
    else:
        head = [f"{pad}if _has(msg, {attr!r}):", f"{pad}    {attr} = msg.{attr}"]
    return [
        *head,
        *_to_rest_tree(rest, present | {attr}, depth + 1),
        f"{pad}else:",
        *_to_rest_tree(rest, present, depth + 1),
    ]


def _to_rest_source() -> str:
    # The fast path: the fields that are set (and non-zero) in almost every
    # record are read first; if they are, and the enums have spellings, a
    # decision tree over the other fields ends in one dict literal per
    # presence pattern. Anything else goes the general way.
    common = [f for f in _FIELDS if f.attr in _USUALLY_SET]
    others = tuple(f for f in _FIELDS if f.attr not in _USUALLY_SET)
    lines = ["def to_rest(msg, *, include_nulls=False):"]
    lines += [f"    {f.attr} = msg.{f.attr}" for f in common]
    lines += ["    if " + " and ".join(f.attr for f in common) + " and not include_nulls:", "        try:"]
    lines += [f"            {f.attr} = _names_{f.key}[{f.attr}]" for f in common if f.kind == _ENUM]
    lines += [
        "        except KeyError:",  # an enum number without a spelling
        "            return _to_rest_general(msg, False)",
        *_to_rest_tree(others, frozenset(f.attr for f in common), 2),
        f"        if _has(msg, {_UNRECOGNIZED!r}):",
        f"            return _with_unrecognized(out, msg.{_UNRECOGNIZED})",
        "        return out",
        "    return _to_rest_general(msg, include_nulls)",
    ]
    return _to_rest_general_source() + "\n\n" + "\n".join(lines) + "\n"


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
        key = extra.key
        if key not in out:
            try:
                out[key] = _json_decode(extra.json_value)
            except RestDecodeError as exc:
                raise RestDecodeError(_key_name(key), f"value is not representable as JSON: {exc.reason}") from None
    return out


def _bind_tables() -> None:
    # The enum tables, bound as globals of this module under the names the
    # compiled code uses (``_by_rest_status``, ``_names_status``, ...).
    for field in _FIELDS:
        if field.kind == _ENUM:
            globals()[f"_by_rest_{field.key}"] = field.by_rest.get
            globals()[f"_names_{field.key}"] = dict(field.by_number)


_bind_tables()

_FROM_REST_DOC: Final = """Build a ``ProtectionShellInfo`` from its REST dictionary form.

    ``data`` is one ``protectionShellInfo`` object as parsed from JSON. Keys and
    enum spellings this schema version does not know are kept in the message
    (its ``unrecognized`` field) so that :func:`to_rest` writes them back
    unchanged; with ``strict=True`` they are rejected instead.

    ``status`` and ``runType`` also take a JSON integer within int32, the
    enum number (``0`` reads as unset); ``strict=True`` refuses numbers that
    have no REST spelling. An unknown key's value is stored as its canonical
    JSON text (objects sorted by key, numbers in ECMAScript form).

    Raises :class:`RestDecodeError`, and nothing else, for every input that
    is not a valid record: a value of the wrong JSON type, an integer outside
    int64, a malformed ``"HH:MM"``, text that is not valid Unicode, an unknown
    value that is not one JSON value within the limits (NaN, a set, a cycle,
    nesting beyond 64, a number of more than 100 characters), a key that is
    not a string or appears twice, a ``data`` that is not a mapping, or a
    mapping whose own methods fail. ``field`` names the REST key (escaped and
    shortened if it is not printable or very long), and the message is one
    line of bounded length.
    """

_TO_REST_DOC: Final = """Write a ``ProtectionShellInfo`` in its REST dictionary form.

    Set fields come out in schema order, integers as ``int``, enums as their
    REST spelling; then the keys this schema version did not know, in the order
    they were received. With ``include_nulls=True`` every known key is present
    and unset ones are ``None``, exactly as the SDK's
    ``APIHelper.to_dictionary`` writes them.

    An enum number that this schema version has no REST spelling for (a newer
    producer's value that reached us in binary form) is written as that number,
    as protobuf's JSON mapping does, so that it is not lost; :func:`from_rest`
    reads it back. An enum explicitly set to its ``_UNSPECIFIED`` zero value
    reads as unset. Raises :class:`RestDecodeError` naming the key if a stored
    ``json_value`` is not valid JSON within the limits.
    """


def _compile(source: str, name: str, doc: str, annotations: dict[str, Any]) -> Any:
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<shellinfo_grpc.rest.{name}>", "exec"), globals(), namespace)  # noqa: S102
    function = namespace.pop(name)
    function.__module__ = __name__
    for helper, code in namespace.items():  # functions the public one calls (_to_rest_general)
        code.__module__ = __name__
        globals()[helper] = code
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
        raise RestDecodeError(None, f"expected an SDK ProtectionShellInfo model, got {type_name(obj)}")
    try:
        data = {key: getattr(obj, attr, None) for attr, key in names.items()}
    except Exception as exc:  # the model's own attributes failed
        raise _unexpected(exc) from exc
    return from_rest(data, strict=strict)


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


def main(argv: list[str] | None = None, *, prog: str = "python -m shellinfo_grpc.rest") -> int:
    """``python -m shellinfo_grpc --show-source``: print the generated code."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="The REST codec of shellinfo-grpc. from_rest and to_rest are generated at import "
        "from the schema's field table; --show-source prints the code that runs.",
    )
    parser.add_argument("--show-source", action="store_true", help="print the generated from_rest and to_rest")
    args = parser.parse_args(argv)
    if not args.show_source:
        parser.print_help()
        return 0
    sys.stdout.write(f"# generated by shellinfo_grpc.rest\n\n{_FROM_REST_SOURCE}\n\n{_TO_REST_SOURCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
