"""JSON values of unknown REST keys: validation within limits, canonical text, comparison.

A REST key that this schema version does not know is kept in
``ExtraRestKey.json_value`` as JSON text. Producers in other languages write
that text their own way (``1e-07`` or ``1e-7``, keys in any order), so the
service compares such values by their *canonical* text, and Python's
``from_rest`` writes that canonical text in the first place. The canonical
form (docs: README, "REST <-> proto mapping"; shared with every language):

* no insignificant whitespace; object members sorted by key, comparing keys
  as sequences of UTF-16 code units; a key twice in one object is invalid;
* strings escape ``"``, ``\\``, and U+0000..U+001F (``\\b \\t \\n \\f \\r``
  by name, the others as ``\\u00xx``, lowercase hex); everything else is
  literal; unpaired surrogates are invalid;
* a number token without fraction or exponent is an integer, exact at any
  size within the limits, written in decimal (``-0`` is ``0``); any other
  number is the nearest finite IEEE-754 double, written as ECMAScript's
  ``Number.prototype.toString`` writes it (``1e-7``, ``100``, ``1e+21``);
* limits: arrays and objects nest at most :data:`MAX_DEPTH` deep, a number
  token has at most :data:`MAX_NUMBER_CHARS` characters.

Every function here raises :class:`~shellinfo_grpc.errors.RestDecodeError`
with ``field=None`` for a value outside these rules; the caller names the key.
Nothing here recurses more than :data:`MAX_DEPTH` levels, whatever it is given.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final, NoReturn

from shellinfo_grpc.errors import RestDecodeError

__all__ = [
    "MAX_DEPTH",
    "MAX_NUMBER_CHARS",
    "canonical",
    "decode",
    "encode",
    "key_name",
    "number_text",
    "quote",
    "same_value",
    "type_name",
]

#: The deepest nesting of arrays and objects in one value (``[]`` is depth 1).
MAX_DEPTH: Final = 64
#: The longest number token, in characters (sign, digits, ".", exponent).
MAX_NUMBER_CHARS: Final = 100
# An integer of more bits than this is at least 2**333, which has 101 digits:
# too long, whatever its sign, without asking for its digits.
_MAX_INT_BITS: Final = 333

# The canonical escapes of a JSON string: `"`, `\` and U+0000..U+001F.
_ESCAPES: Final = {i: f"\\u{i:04x}" for i in range(0x20)} | {
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0C: "\\f",
    0x0D: "\\r",
    0x22: '\\"',
    0x5C: "\\\\",
}


def _invalid(reason: str) -> NoReturn:
    raise RestDecodeError(None, reason)


def quote(text: str, limit: int = 60, *, marks: bool = True) -> str:
    """``text`` as a one-line, bounded, printable string, for messages.

    Written as Python's ``repr`` writes it (quotation marks, backslash escapes
    for control characters, line separators and lone surrogates); beyond
    ``limit`` characters the text is cut and the number of characters left
    out is said. With ``marks=False`` there are no quotation marks around it
    (for a REST key in the ``field`` of an error).
    """
    text = str.__str__(text)
    shown = repr(text[:limit])
    if not marks:
        shown = shown[1:-1]
    more = len(text) - limit
    return shown + (f"... ({more} more characters)" if more > 0 else "")


def key_name(key: str) -> str:
    """A REST key as an error's ``field`` names it: itself if printable and short, else escaped and cut.

    The empty key is shown as ``""`` so that the field is never blank.
    """
    return quote(key, 60, marks=False) or '""'


def type_name(value: object) -> str:
    """The name of ``value``'s type for a message: printable, one line, bounded."""
    return quote(type(value).__name__, 40, marks=False)


def _int_text(value: int) -> str:
    """Decimal text of an integer known to be a valid JSON integer here."""
    if value.bit_length() > _MAX_INT_BITS:
        # str() of a big int is quadratic (and refused beyond 4300 digits).
        _invalid(f"integer of about {int(value.bit_length() * 0.30103) + 1} digits exceeds the limit")
    text = int.__repr__(value)
    if len(text) > MAX_NUMBER_CHARS:
        _invalid(f"number of {len(text)} characters exceeds the limit of {MAX_NUMBER_CHARS}")
    return text


def number_text(value: float) -> str:
    """A finite double written as ECMAScript's ``Number.prototype.toString``.

    The digits are the shortest that read back as the same double (Python's
    ``repr`` finds the same digits); only the layout differs from ``repr``.
    """
    if value == 0:
        return "0"  # -0 too
    if not math.isfinite(value):
        _invalid(f"{value!r} is not a JSON number")
    sign = "-" if value < 0 else ""
    mantissa, _, exponent = float.__repr__(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    s = digits.lstrip("0")
    # value = 0.s x 10**n: the point sits after `whole`, moved by the exponent
    # and by the leading zeros stripped from the digits.
    n = len(whole) + (int(exponent) if exponent else 0) - (len(digits) - len(s))
    s = s.rstrip("0")
    k = len(s)
    if k <= n <= 21:
        out = s + "0" * (n - k)
    elif 0 < n <= 21:
        out = s[:n] + "." + s[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * -n + s
    else:
        e = n - 1
        lead = s if k == 1 else s[0] + "." + s[1:]
        out = f"{lead}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + out


def _string(text: str) -> str:
    """A JSON string in canonical form; ``text`` is an exact ``str``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        _invalid("text is not valid Unicode (lone surrogate)")
    return '"' + text.translate(_ESCAPES) + '"'


def _utf16_order(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _object(items: list[tuple[str, str]]) -> str:
    """Members (canonical key text, canonical value text) sorted, duplicates refused."""
    items.sort(key=lambda item: _utf16_order(item[0]))
    for (a, _), (b, _) in itertools.pairwise(items):
        if a == b:
            _invalid(f"object has the key {quote(a)} twice")
    return "{" + ",".join(f"{_string(key)}:{value}" for key, value in items) + "}"


def _encode(value: object, depth: int, path: set[int]) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return _int_text(value)
    if isinstance(value, str):
        return _string(str.__str__(value))
    if isinstance(value, int):  # an int subclass (IntEnum, say): its value
        return _int_text(int(value))
    if isinstance(value, float):
        text = number_text(float(value))
        if len(text) > MAX_NUMBER_CHARS:  # pragma: no cover - a double needs at most 25
            _invalid("number too long")
        return text
    if isinstance(value, (list, tuple, Mapping)):
        if depth >= MAX_DEPTH:
            _invalid(f"nested deeper than {MAX_DEPTH} arrays/objects")
        ident = id(value)
        if ident in path:
            _invalid("contains itself (a reference cycle)")
        path.add(ident)
        if isinstance(value, Mapping):
            members: list[tuple[str, str]] = []
            for key, member in value.items():
                if not isinstance(key, str):
                    _invalid(f"object key of type {type_name(key)} is not a string")
                members.append((str.__str__(key), _encode(member, depth + 1, path)))
            text = _object(members)
        else:
            text = "[" + ",".join([_encode(item, depth + 1, path) for item in value]) + "]"
        path.discard(ident)
        return text
    _invalid(f"a Python {type_name(value)} is not a JSON value")


def encode(value: object) -> str:
    """The canonical JSON text of a Python value as ``json.loads`` would give it.

    Accepts ``None``, ``bool``, ``int``, finite ``float``, ``str``, lists,
    tuples and mappings with string keys, within the limits; anything else
    (NaN, a set, bytes, a cycle, a key that is not a string) is refused.
    """
    kind = type(value)
    if kind is str:  # the common unknown values first: a string, an integer
        return _string(value)  # type: ignore[arg-type]
    if kind is int and -_SMALL_INT <= value <= _SMALL_INT:  # type: ignore[operator]
        return int.__repr__(value)
    return _encode(value, 0, set())


# Canonical texts the decoder reads without the general parser: a string
# without escapes (valid Unicode, as a protobuf string always is), an integer
# of at most 18 digits.
_PLAIN_STRING: Final = re.compile(r'"[^"\\\x00-\x1f]*"')
_SMALL_INT_TEXT: Final = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_SMALL_INT: Final = 10**18


def _parse_int(token: str) -> int:
    if len(token) > MAX_NUMBER_CHARS:
        _invalid(f"number of {len(token)} characters exceeds the limit of {MAX_NUMBER_CHARS}")
    return int(token)


def _parse_float(token: str) -> float:
    if len(token) > MAX_NUMBER_CHARS:
        _invalid(f"number of {len(token)} characters exceeds the limit of {MAX_NUMBER_CHARS}")
    value = float(token)
    if not math.isfinite(value):
        _invalid(f"number {token} is beyond the range of a double")
    return value


def _parse_constant(token: str) -> NoReturn:
    _invalid(f"{token} is not a JSON value")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                _invalid(f"object has the key {quote(key)} twice")
            seen.add(key)
    return value


_DECODER: Final = json.JSONDecoder(
    parse_int=_parse_int,
    parse_float=_parse_float,
    parse_constant=_parse_constant,
    object_pairs_hook=_pairs,
)


def decode(text: str) -> Any:
    """Read JSON text into Python values (objects as dicts, in text order).

    Refuses what is not exactly one JSON value within the limits: trailing
    data, ``NaN``/``Infinity``, a key twice in one object, lone surrogates,
    nesting beyond :data:`MAX_DEPTH`, number tokens beyond
    :data:`MAX_NUMBER_CHARS` or beyond the range of a double.
    """
    if not isinstance(text, str):
        _invalid(f"expected JSON text, got a Python {type_name(text)}")
    if _PLAIN_STRING.fullmatch(text):
        value: Any = text[1:-1]
        _check_decoded(value)
        return value
    if _SMALL_INT_TEXT.fullmatch(text):
        return int(text)
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        _invalid(f"nested deeper than {MAX_DEPTH} arrays/objects")
    except json.JSONDecodeError as exc:
        _invalid(f"not valid JSON: {exc.msg} at character {exc.pos}")
    _check_decoded(value)
    return value


def _check_decoded(value: Any) -> None:
    """Depth and text checks that the JSON decoder does not make (iteratively)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if type(item) is str:
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                _invalid("text is not valid Unicode (lone surrogate)")
        elif type(item) is list or type(item) is dict:
            if depth >= MAX_DEPTH:
                _invalid(f"nested deeper than {MAX_DEPTH} arrays/objects")
            if type(item) is dict:
                stack.extend((key, depth + 1) for key in item)
                stack.extend((member, depth + 1) for member in item.values())
            else:
                stack.extend((member, depth + 1) for member in item)


def canonical(text: str) -> str:
    """The canonical form of JSON text (see the module docstring).

    Equal JSON values have equal canonical texts, whichever writer produced
    them: ``canonical("1e-07") == canonical("1E-7") == "1e-7"``.
    """
    return encode(decode(text))


def same_value(a: str, b: str) -> bool:
    """Whether two JSON texts hold the same JSON value (compared canonically)."""
    return a == b or canonical(a) == canonical(b)
