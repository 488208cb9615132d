"""Shared test helpers. Keep this file small and generic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def _typed(value: Any) -> Any:
    """A form of a JSON value in which ``==`` also compares types and order.

    Plain ``==`` says ``1 == 1.0 == True`` and ignores the order of dict keys;
    this form does neither, except at the top level, where key order is left
    to the caller.
    """
    if isinstance(value, dict):
        return ("object", tuple((key, _typed(item)) for key, item in value.items()))
    if isinstance(value, list):
        return ("array", tuple(_typed(item) for item in value))
    return (type(value).__name__, value)


@pytest.fixture(scope="session")
def same_json() -> Callable[[Any, Any], bool]:
    """Compare two JSON values exactly: same types, same nested key order.

    Top-level keys may come in any order (``to_rest`` writes known keys in
    schema order); nested objects must keep theirs.
    """

    def compare(a: Any, b: Any) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: _typed(v) for k, v in a.items()} == {k: _typed(v) for k, v in b.items()}
        return _typed(a) == _typed(b)

    return compare
