"""How a run update is shown: a row of the table that list and watch print, or a JSON object."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from shellinfo_grpc.errors import RestDecodeError
from shellinfo_grpc.rest import to_rest
from shellinfo_grpc.run_instance import job_to_rest

if TYPE_CHECKING:
    from shellinfo_grpc._gen.shellinfo.v1.run_update_service_pb2 import RunUpdate

__all__ = ["COLUMNS", "cells", "clip", "describe", "raw_dict", "row", "table", "unshowable", "update_dict"]


def update_dict(update: RunUpdate) -> dict[str, Any]:
    """One update as JSON: its revision, source, accepted time, the run in REST form and its job, if any.

    The job is ``"job": {"jobId", "jobName", "jobUid"}`` (the keys it has), absent for a run published
    without one.
    """
    out: dict[str, Any] = {
        "revision": update.revision,
        "source": update.source,
        "acceptedTimeUsecs": update.accepted_time_usecs,
        "run": to_rest(update.run),
    }
    if update.HasField("job"):
        out["job"] = job_to_rest(update.job)
    return out


def unshowable(update: RunUpdate) -> str | None:
    """Why ``update`` cannot be shown in REST form (a bad record already stored), or None.

    The service refuses such records today, but a store may hold one written
    before, or by hand: consumers skip it with one line rather than fail.
    """
    try:
        to_rest(update.run)
    except RestDecodeError as exc:
        return str(exc)
    return None


def raw_dict(update: RunUpdate) -> dict[str, Any]:
    """An update whose run cannot be shown in REST form: the run as base64 of its bytes."""
    return {
        "revision": update.revision,
        "source": update.source,
        "acceptedTimeUsecs": update.accepted_time_usecs,
        "runBase64": base64.b64encode(update.run.SerializeToString()).decode(),
    }


def describe(update: RunUpdate) -> str:
    """Which update this is, for a one-line message."""
    job = update.run.job_run_id if update.run.HasField("job_run_id") else "(none)"
    return f"revision {update.revision} (source {_printable(repr(update.source))[:40]}, jobRunId {job})"


def _printable(text: str) -> str:
    """Text safe to put on a terminal: control characters (escape sequences, line breaks) become '?'."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _utc(usecs: Any) -> str:
    """Unix microseconds as UTC ISO 8601 to the second, or the number when out of range."""
    if not isinstance(usecs, int):
        return "-"
    try:
        moment = _EPOCH + datetime.timedelta(microseconds=usecs)
    except OverflowError:
        return str(usecs)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class _Column:
    title: str
    width: int  # the least width, for rows written before the widths of the rest are known
    right: bool = False


COLUMNS: Final = (
    _Column("REVISION", 8, right=True),
    _Column("SOURCE", 12),
    _Column("JOB", 12),
    _Column("JOB RUN ID", 10, right=True),
    _Column("RUN TYPE", 8),
    _Column("STATUS", 11),
    _Column("START", 20),
    _Column("END", 20),
    _Column("ERROR", 0),
)


#: Longest error text shown in a table.
_ERROR_WIDTH: Final = 60


#: Longest source shown in a table.
_SOURCE_WIDTH: Final = 24

#: Longest job name shown in a table.
_JOB_WIDTH: Final = 24


def _job_cell(update: RunUpdate) -> str:
    """The job's name; its id (``#7``) when it has no name; ``-`` without a job."""
    job = update.job
    if job.HasField("job_name") and job.job_name:
        return clip(_printable(job.job_name), _JOB_WIDTH)
    if job.HasField("job_id"):
        return f"#{job.job_id}"
    return "-"


def cells(update: RunUpdate) -> list[str]:
    rest = to_rest(update.run)
    return [
        str(update.revision),
        clip(_printable(update.source), _SOURCE_WIDTH) or "-",
        _job_cell(update),
        str(rest.get("jobRunId", "-")),
        _printable(str(rest.get("runType", "-"))),
        _printable(str(rest.get("status", "-"))),
        _utc(rest.get("startTimeUsecs")),
        _utc(rest.get("endTimeUsecs")),
        clip(_printable(rest.get("error", "")), _ERROR_WIDTH),
    ]


def row(cells: Sequence[str], widths: Sequence[int]) -> str:
    parts = [
        cell.rjust(width) if column.right else cell.ljust(width)
        for cell, width, column in zip(cells, widths, COLUMNS, strict=True)
    ]
    return "  ".join(parts).rstrip()


def _widths(rows: Sequence[Sequence[str]]) -> list[int]:
    widths = [len(column.title) for column in COLUMNS]
    for cells in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]
    widths[-1] = 0  # the last column is not padded
    return widths


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = _widths(rows)
    return [row([c.title for c in COLUMNS], widths), *(row(cells, widths) for cells in rows)]
