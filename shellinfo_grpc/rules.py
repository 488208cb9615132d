"""The rules of the run-update service, independent of storage and transport.

Every store applies :func:`check_run` to each update and :func:`check_change`
inside its atomic section (a transaction, an optimistic-concurrency retry), so
the rules hold whichever backend runs them. Refusals are :class:`RunRejected` errors that name
the REST key at fault; the server turns them into gRPC statuses with
google.rpc details, the client turns those back into the same error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as _pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc
from shellinfo_grpc._status import REASON_INVALID_RUN, REASON_RUN_FINAL
from shellinfo_grpc.errors import RunRejected
from shellinfo_grpc.rest import rest_names

__all__ = [
    "FINAL_STATUSES",
    "check_change",
    "check_run",
    "check_update",
    "compile_filter",
    "is_final",
]

_S = _pb.RunStatus

#: The statuses after which a run does not change any more.
FINAL_STATUSES: Final = frozenset(
    {_S.RUN_STATUS_SUCCESS, _S.RUN_STATUS_FAILURE, _S.RUN_STATUS_WARNING, _S.RUN_STATUS_CANCELED, _S.RUN_STATUS_MISSED}
)

_STATUS_NAMES: Final = rest_names(_pb.RunStatus.DESCRIPTOR)


def is_final(run: _pb.ProtectionShellInfo) -> bool:
    """Whether ``run`` has a final status (kSuccess, kFailure, kWarning, kCanceled, kMissed)."""
    return run.HasField("status") and run.status in FINAL_STATUSES


def check_run(run: _pb.ProtectionShellInfo | None) -> None:
    """Refuse a run that can never be accepted, whatever the stored state.

    A missing ``jobRunId`` and an ``endTimeUsecs`` before ``startTimeUsecs``
    are ``INVALID_ARGUMENT``.
    """
    violations: list[tuple[str, str]] = []
    if run is None or not run.HasField("job_run_id"):
        violations.append(("jobRunId", "is required: it identifies the run"))
    elif (
        run.HasField("start_time_usecs")
        and run.HasField("end_time_usecs")
        and run.end_time_usecs < run.start_time_usecs
    ):
        violations.append(
            (
                "endTimeUsecs",
                f"end time {run.end_time_usecs} is before the start time {run.start_time_usecs}",
            )
        )
    if violations:
        raise RunRejected(
            "INVALID_ARGUMENT",
            REASON_INVALID_RUN,
            "; ".join(f"{field} {text}" for field, text in violations),
            violations,
        )


def _status_text(run: _pb.ProtectionShellInfo) -> str:
    if run.HasField("status"):
        return _STATUS_NAMES.get(run.status, str(run.status))
    if run.HasField("unrecognized") and run.unrecognized.HasField("status"):
        return repr(run.unrecognized.status)
    return "unset"


def _same_status(a: _pb.ProtectionShellInfo, b: _pb.ProtectionShellInfo) -> bool:
    if a.HasField("status") or b.HasField("status"):
        return a.HasField("status") and b.HasField("status") and a.status == b.status
    ua = a.unrecognized.status if a.HasField("unrecognized") and a.unrecognized.HasField("status") else None
    ub = b.unrecognized.status if b.HasField("unrecognized") and b.unrecognized.HasField("status") else None
    return ua == ub


def check_update(current: _pb.ProtectionShellInfo | None, new: _pb.ProtectionShellInfo) -> bool:
    """Decide whether ``new`` changes a run whose stored state is ``current``.

    Returns ``False`` when ``new`` is identical to ``current`` (a no-op that a
    retrying agent may cause), ``True`` when it is a change to record. Raises
    :class:`RunRejected` (``FAILED_PRECONDITION``, reason ``RUN_FINAL``) when
    ``current`` has a final status and ``new`` has a different one. Also
    applies :func:`check_run`.
    """
    check_run(new)
    return check_change(current, new)


def check_change(current: _pb.ProtectionShellInfo | None, new: _pb.ProtectionShellInfo) -> bool:
    """:func:`check_update` for a run that has passed :func:`check_run` already."""
    if current is None:
        return True
    if current == new:
        return False
    if is_final(current) and not _same_status(current, new):
        raise RunRejected(
            "FAILED_PRECONDITION",
            REASON_RUN_FINAL,
            f"run {new.job_run_id} already has the final status {_status_text(current)}; "
            f"status {_status_text(new)} is refused",
            [("status", f"the run is final ({_status_text(current)}) and cannot change status")],
        )
    return True


def compile_filter(flt: _svc.RunFilter | None) -> Callable[[_svc.RunUpdate], bool]:
    """Turn a ``RunFilter`` into a predicate over ``RunUpdate`` messages.

    Within one list the values are alternatives; the lists combine with AND;
    an empty list matches everything.
    """
    if flt is None:
        return lambda update: True
    sources = frozenset(flt.sources)
    ids = frozenset(flt.job_run_ids)
    statuses = frozenset(flt.statuses)
    run_types = frozenset(flt.run_types)
    tests: list[Callable[[_svc.RunUpdate], bool]] = []
    if sources:
        tests.append(lambda u: u.source in sources)
    if ids:
        tests.append(lambda u: u.run.job_run_id in ids)
    if statuses:
        tests.append(lambda u: u.run.HasField("status") and u.run.status in statuses)
    if run_types:
        tests.append(lambda u: u.run.HasField("run_type") and u.run.run_type in run_types)
    if not tests:
        return lambda update: True
    if len(tests) == 1:
        return tests[0]
    checks: Sequence[Callable[[_svc.RunUpdate], bool]] = tuple(tests)
    return lambda u: all(test(u) for test in checks)
