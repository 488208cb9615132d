"""The error contract of the run-update service, both ways.

A refused or failed call carries a gRPC status code, a message, and two
google.rpc details: ``ErrorInfo`` (a machine-readable ``reason`` in the
``shellinfo.v1`` domain, and ``metadata``) and ``BadRequest`` (the REST keys at
fault). A refused item of a ``PublishRuns`` stream carries the same in a
``PublishError``. Every reason and metadata key is a constant here, so that the
server that writes them and the client that reads them use the same words.

This module turns a :class:`~shellinfo_grpc.errors.ServiceError` into those
wire forms (:func:`error_status`, :func:`status_proto`, :func:`publish_error`)
and reads them back (:func:`details`, :func:`code_name`); choosing the error
class is the client's. It imports neither grpc nor the rest of the package, so
that :mod:`shellinfo_grpc.errors` can use its constants.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc

__all__ = [
    "DOMAIN",
    "KEY_HEAD_REVISION",
    "KEY_JOB_RUN_ID",
    "KEY_LAST_REVISION",
    "KEY_OLDEST_REVISION",
    "KEY_REQUESTED_REVISION",
    "KEY_SOURCE",
    "MAX_MESSAGE_BYTES",
    "MAX_VIOLATIONS",
    "REASON_HISTORY_EXPIRED",
    "REASON_INVALID_REQUEST",
    "REASON_INVALID_RUN",
    "REASON_REVISION_IN_FUTURE",
    "REASON_RUN_FINAL",
    "REASON_RUN_NOT_FOUND",
    "REASON_RUN_TOO_LARGE",
    "REASON_SERVER_SHUTTING_DOWN",
    "REASON_STORE_UNAVAILABLE",
    "REASON_WATCHER_TOO_SLOW",
    "REFUSED_CODES",
    "Details",
    "ErrorParts",
    "bounded",
    "code_name",
    "code_number",
    "details",
    "error_status",
    "publish_error",
    "status_proto",
]

#: The ``ErrorInfo.domain`` of every reason below.
DOMAIN: Final = "shellinfo.v1"

# --- reasons (ErrorInfo.reason) ------------------------------------------------

#: INVALID_ARGUMENT: a run that can never be accepted (no jobRunId, end before start).
REASON_INVALID_RUN: Final = "INVALID_RUN"
#: INVALID_ARGUMENT: a run larger than the service accepts.
REASON_RUN_TOO_LARGE: Final = "RUN_TOO_LARGE"
#: INVALID_ARGUMENT: a request field out of range (page_size, page_token, start_revision, ...).
REASON_INVALID_REQUEST: Final = "INVALID_REQUEST"
#: FAILED_PRECONDITION: the run has a final status and the update changes it.
REASON_RUN_FINAL: Final = "RUN_FINAL"
#: NOT_FOUND: GetRun of a run the service does not have.
REASON_RUN_NOT_FOUND: Final = "RUN_NOT_FOUND"
#: OUT_OF_RANGE: a watch starts before the oldest retained revision.
REASON_HISTORY_EXPIRED: Final = "HISTORY_EXPIRED"
#: OUT_OF_RANGE: a watch starts beyond the head + 1 (the store was replaced or reset).
REASON_REVISION_IN_FUTURE: Final = "REVISION_IN_FUTURE"
#: UNAVAILABLE: the store cannot be reached now.
REASON_STORE_UNAVAILABLE: Final = "STORE_UNAVAILABLE"
#: UNAVAILABLE: the server is shutting down; a watch resumes elsewhere.
REASON_SERVER_SHUTTING_DOWN: Final = "SERVER_SHUTTING_DOWN"
#: RESOURCE_EXHAUSTED: a watcher fell too far behind; it resumes from its last revision.
REASON_WATCHER_TOO_SLOW: Final = "WATCHER_TOO_SLOW"

# --- metadata keys (ErrorInfo.metadata) ------------------------------------------

#: The last revision a watch was sent (SERVER_SHUTTING_DOWN, WATCHER_TOO_SLOW).
KEY_LAST_REVISION: Final = "last_revision"
#: The oldest revision a watch can start from now (HISTORY_EXPIRED).
KEY_OLDEST_REVISION: Final = "oldest_revision"
#: The revision the watch asked for (HISTORY_EXPIRED).
KEY_REQUESTED_REVISION: Final = "requested_revision"
#: The newest revision the service has (REVISION_IN_FUTURE).
KEY_HEAD_REVISION: Final = "head_revision"
#: The run GetRun did not find (RUN_NOT_FOUND).
KEY_SOURCE: Final = "source"
KEY_JOB_RUN_ID: Final = "job_run_id"

#: Status codes that mean "the update was refused" on publish.
REFUSED_CODES: Final = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION"})


# --- bounds -------------------------------------------------------------------------
#
# A refusal travels in trailing metadata (grpc-message, grpc-status-details-bin),
# which a gRPC client accepts only up to 8 KiB (16 KiB at the most): a refusal
# that lists every violation of a hostile run would reach the client as
# RESOURCE_EXHAUSTED instead. So every refusal is cut to these bounds, whatever
# the input; the message says how many violations were left out. Worst case
# (every character non-ASCII): grpc-message ~3 x 800 bytes percent-encoded, the
# details ~4/3 x (800 + 20 x 300) bytes base64-encoded; well under 16 KiB.

#: A refusal lists at most this many field violations (the first ones found).
MAX_VIOLATIONS: Final = 20
#: The longest status message, in UTF-8 bytes.
MAX_MESSAGE_BYTES: Final = 800
_MAX_FIELD_BYTES: Final = 120
_MAX_DESCRIPTION_BYTES: Final = 180
_CUT_MARK: Final = "..."


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (on a character boundary), marked as cut."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return data.decode("utf-8")
    return data[: limit - len(_CUT_MARK)].decode("utf-8", "ignore") + _CUT_MARK


def bounded(message: str, violations: Iterable[tuple[str, str]]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``message`` and ``violations`` cut to what one refusal may carry (see MAX_VIOLATIONS, MAX_MESSAGE_BYTES).

    At most :data:`MAX_VIOLATIONS` violations are kept, each field and
    description cut to a bounded length; when some are left out, the message
    ends with ``... and N more``. The message is cut to
    :data:`MAX_MESSAGE_BYTES`. A refusal within the bounds is returned as is.
    """
    kept: list[tuple[str, str]] = []
    dropped = 0
    for field, description in violations:
        if len(kept) < MAX_VIOLATIONS:
            kept.append((_cut(field, _MAX_FIELD_BYTES), _cut(description, _MAX_DESCRIPTION_BYTES)))
        else:
            dropped += 1
    more = f" ... and {dropped} more" if dropped else ""
    return _cut(message, MAX_MESSAGE_BYTES - len(more)) + more, tuple(kept)


class ErrorParts(Protocol):
    """What a refusal is made of; :class:`~shellinfo_grpc.errors.ServiceError` has it all."""

    code: str
    reason: str
    message: str
    violations: tuple[tuple[str, str], ...]
    metadata: dict[str, str]


def code_number(name: str) -> int:
    """The number of a status code named as gRPC names it (``"INVALID_ARGUMENT"`` -> 3)."""
    return int(code_pb2.Code.Value(name))


def code_name(number: int) -> str:
    """The name of a status code number, or the number as text when it has none."""
    try:
        return str(code_pb2.Code.Name(number))
    except ValueError:
        return str(number)


def status_proto(
    code: str,
    message: str,
    *,
    reason: str = "",
    violations: Iterable[tuple[str, str]] = (),
    metadata: dict[str, str] | None = None,
) -> status_pb2.Status:
    """A google.rpc ``Status`` with an ``ErrorInfo`` (when ``reason`` is set) and a ``BadRequest`` detail.

    The message and the violations are cut to the bounds of :func:`bounded`.
    """
    message, violations = bounded(message, violations)
    parts: list[any_pb2.Any] = []
    if reason:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {}))
        parts.append(info)
    bad = [error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]
    if bad:
        request = any_pb2.Any()
        request.Pack(error_details_pb2.BadRequest(field_violations=bad))
        parts.append(request)
    return status_pb2.Status(code=code_number(code), message=message, details=parts)


def error_status(exc: ErrorParts) -> status_pb2.Status:
    """The google.rpc ``Status`` that carries ``exc`` to a client."""
    return status_proto(exc.code, exc.message, reason=exc.reason, violations=exc.violations, metadata=exc.metadata)


@dataclass(frozen=True, slots=True)
class Details:
    """What the google.rpc details of a status say: reason, metadata and (REST key, description) pairs."""

    reason: str = ""
    metadata: dict[str, str] | None = None
    violations: tuple[tuple[str, str], ...] = ()


def details(status: status_pb2.Status) -> Details:
    """Read the ``ErrorInfo`` and ``BadRequest`` details of a status; others are ignored."""
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
    return Details(reason, metadata, tuple(violations))


def publish_error(exc: ErrorParts) -> _svc.PublishError:
    """The ``PublishError`` of a refused item of a ``PublishRuns`` stream (cut as :func:`bounded` says)."""
    message, violations = bounded(exc.message, exc.violations)
    return _svc.PublishError(
        code=code_number(exc.code),
        message=message,
        reason=exc.reason,
        field_violations=[_svc.FieldViolation(field=f, description=d) for f, d in violations],
    )
