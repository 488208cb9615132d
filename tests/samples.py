"""Sample records that several test modules use."""

from __future__ import annotations

from typing import Any, Final

__all__ = ["COMPLETED"]

#: A finished run with every field the schema knows, as the REST API returns it.
COMPLETED: Final[dict[str, Any]] = {
    "jobRunId": 41234,
    "startTimeUsecs": 1700000000123456,
    "endTimeUsecs": 1700000360654321,
    "runType": "kRegular",
    "status": "kSuccess",
    "startTimeHhmm": "22:13",
    "endTimeHhmm": "22:19",
}
