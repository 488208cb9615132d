"""An independent oracle for the canonical ``json_value`` form (shared decision 1).

Written from the rule text, not from ``shellinfo_grpc._jsonvalue``: the tests
compare the package against it. ``value_key`` maps a Python JSON value to a
form in which ``==`` means "the same JSON value" as the rules define it
(integers exact, other numbers as doubles, objects regardless of key order);
``canonical_text`` writes the canonical text itself.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

__all__ = ["canonical_text", "es_number", "value_key"]


def es_number(x: float) -> str:
    """ECMAScript ``Number.prototype.toString`` for a finite double, from the spec's steps."""
    if x == 0:
        return "0"
    assert math.isfinite(x)
    if x < 0:
        return "-" + es_number(-x)
    # Step 5: the fewest digits s (k of them) whose value reads back as x;
    # among several, the one closest to x; of two as close, the even one.
    exact = Decimal(x)
    for k in range(1, 18):
        rounded = Decimal(f"{x:.{k - 1}e}")
        ulp = Decimal(1).scaleb(rounded.adjusted() - (k - 1))
        fits = [c for c in (rounded - ulp, rounded, rounded + ulp) if c > 0 and float(c) == x]
        if fits:
            best = min(fits, key=lambda c: (abs(c - exact), c.as_tuple().digits[-1] % 2))
            break
    digits = best.as_tuple().digits
    s = "".join(map(str, digits)).rstrip("0") or "0"
    exponent = str(best.adjusted())
    k = len(s)
    n = int(exponent) + 1
    if k <= n <= 21:
        return s + "0" * (n - k)
    if 0 < n <= 21:
        return s[:n] + "." + s[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + s
    sign = "+" if n - 1 >= 0 else "-"
    if k == 1:
        return f"{s}e{sign}{abs(n - 1)}"
    return f"{s[0]}.{s[1:]}e{sign}{abs(n - 1)}"


def _string(text: str) -> str:
    named = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    out = []
    for c in text:
        if c in named:
            out.append(named[c])
        elif ord(c) < 0x20:
            out.append("\\u%04x" % ord(c))  # noqa: UP031 - the rule's own wording
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _utf16_units(key: str) -> list[int]:
    units: list[int] = []
    for c in key:
        code = ord(c)
        if code > 0xFFFF:
            code -= 0x10000
            units += [0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)]
        else:
            units.append(code)
    return units


def canonical_text(value: Any) -> str:
    """The canonical text of a JSON value given as Python values (floats for number tokens with . or e)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return es_number(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(canonical_text(v) for v in value) + "]"
    if isinstance(value, dict):
        keys = sorted(value, key=_utf16_units)
        return "{" + ",".join(f"{_string(k)}:{canonical_text(value[k])}" for k in keys) + "}"
    raise TypeError(type(value).__name__)


def value_key(value: Any) -> Any:
    """A form of a JSON value where ``==`` is equality of JSON values under the canonical rules.

    A double that ECMAScript writes without fraction or exponent reads back
    as an integer token, so it equals that integer.
    """
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, float):
        text = es_number(value)
        if "." not in text and "e" not in text:
            return ("number", int(text))
        return ("number", text)
    if isinstance(value, int):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, (list, tuple)):
        return ("array", tuple(value_key(v) for v in value))
    if isinstance(value, dict):
        return ("object", frozenset((k, value_key(v)) for k, v in value.items()))
    raise TypeError(type(value).__name__)
