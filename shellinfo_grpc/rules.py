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

from google.protobuf.unknown_fields import UnknownFieldSet

from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as _pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc
from shellinfo_grpc._jsonvalue import canonical, decode, quote
from shellinfo_grpc._jsonvalue import key_name as _key_name
from shellinfo_grpc._status import MAX_VIOLATIONS, REASON_INVALID_RUN, REASON_RUN_FINAL, bounded
from shellinfo_grpc.errors import RestDecodeError, RunRejected
from shellinfo_grpc.rest import REST_KEYS, rest_names

__all__ = [
    "FINAL_STATUSES",
    "check_change",
    "check_run",
    "check_storable",
    "check_update",
    "compile_filter",
    "is_final",
    "same_run",
]

_S = _pb.RunStatus

#: The statuses after which a run does not change any more.
FINAL_STATUSES: Final = frozenset(
    {_S.RUN_STATUS_SUCCESS, _S.RUN_STATUS_FAILURE, _S.RUN_STATUS_WARNING, _S.RUN_STATUS_CANCELED, _S.RUN_STATUS_MISSED}
)

_STATUS_NAMES: Final = rest_names(_pb.RunStatus.DESCRIPTOR)
_RUN_TYPE_NAMES: Final = rest_names(_pb.RunType.DESCRIPTOR)
#: The REST spellings of the final statuses.
_STATUS_NUMBERS: Final = {name: number for number, name in _STATUS_NAMES.items()}
_FINAL_SPELLINGS: Final = frozenset(_STATUS_NAMES[number] for number in FINAL_STATUSES)
_VALID_HHMM: Final = frozenset(f"{h:02d}:{m:02d}" for h in range(24) for m in range(60))
_KNOWN_KEYS: Final = frozenset(REST_KEYS)


def _unrecognized_status(run: _pb.ProtectionShellInfo) -> str | None:
    if run.HasField("unrecognized") and run.unrecognized.HasField("status"):
        return run.unrecognized.status
    return None


def _extra_status(unrecognized: _pb.UnrecognizedRest) -> int | str | None:
    """The value of an extra key named ``status``, if it is a spelling or a number.

    :func:`~shellinfo_grpc.rest.to_rest` writes the first such key where
    neither the enum nor ``unrecognized.status`` is set; :func:`check_run`
    refuses it, but a file or a store written before that check may hold one.
    A value that is not JSON (``to_rest`` refuses the run) or neither a
    string nor an integer shows no status.
    """
    for extra in unrecognized.extra_keys:
        if extra.key == "status":
            try:
                value = decode(extra.json_value)
            except RestDecodeError:
                return None
            if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
                return value
            return None
    return None


def _shown_status(run: _pb.ProtectionShellInfo) -> int | str | None:
    """The ``status`` that :func:`~shellinfo_grpc.rest.to_rest` writes for ``run``.

    An enum number (spelled or not; ``0`` reads as unset), else the spelling
    kept in ``unrecognized.status``, else the value of an extra key named
    ``status`` (see :func:`_extra_status`), else ``None``.
    """
    status = run.status
    if status:
        return status
    if not run.HasField("unrecognized"):
        return None
    unrecognized = run.unrecognized
    if unrecognized.HasField("status"):
        return unrecognized.status
    return _extra_status(unrecognized)


def is_final(run: _pb.ProtectionShellInfo) -> bool:
    """Whether ``run`` shows a final status (kSuccess, kFailure, kWarning, kCanceled, kMissed).

    Exactly when :func:`~shellinfo_grpc.rest.to_rest` writes a final status
    as ``status`` (a spelling, or a number that :func:`~shellinfo_grpc.rest.from_rest`
    reads as one): the enum value, or, where the enum is unset, the spelling
    kept in ``unrecognized.status``, or else an extra key named ``status``
    (:func:`check_run` accepts neither a known spelling in
    ``unrecognized.status`` nor a known REST key among the extra keys, but a
    stored record may predate that check). The common case, the enum set,
    costs one read.
    """
    status = run.status
    if status:
        return status in FINAL_STATUSES
    shown = _shown_status(run)
    return shown in _FINAL_SPELLINGS or shown in FINAL_STATUSES


def _enum_violations(
    run: _pb.ProtectionShellInfo, attr: str, key: str, names: dict[int, str], violations: list[tuple[str, str]]
) -> None:
    set_number = run.HasField(attr)  # type: ignore[arg-type]
    if set_number and getattr(run, attr) == 0:
        violations.append((key, f"is set to 0 (_UNSPECIFIED), which REST cannot show: leave {key} unset instead"))
    if not run.HasField("unrecognized") or not run.unrecognized.HasField(attr):  # type: ignore[arg-type]
        return
    spelling = getattr(run.unrecognized, attr)
    if set_number:
        violations.append((key, f"unrecognized.{attr} is set although the enum {attr} is set"))
    elif spelling in names.values():
        violations.append(
            (key, f"unrecognized.{attr} holds {quote(spelling)}, a known spelling: set the enum {attr} instead")
        )


def check_storable(run: _pb.ProtectionShellInfo) -> None:
    """Refuse a run whose REST form would not read back as the same message.

    The service stores only runs that every consumer can show: ``to_rest``
    can write it, and ``from_rest`` reads that back as the same message (with
    ``json_value`` texts compared by canonical form). So, violations named by
    REST key:

    * ``startTimeHhmm`` / ``endTimeHhmm``: must be ``"HH:MM"``, 00:00 to 23:59;
    * ``status`` / ``runType``: not set explicitly to ``0`` (``_UNSPECIFIED``,
      which REST shows as unset); ``unrecognized.status`` / ``run_type`` only
      where the enum is unset, and only a spelling the schema does not know;
    * an unknown key (``unrecognized.extra_keys[i]``): the violation is named
      by **the key itself**, as it appears in the REST object (escaped and
      shortened if not printable or very long). It must not be a known REST
      key, nor appear twice, and its ``json_value`` must be one valid JSON
      value within the limits (nesting depth 64, number tokens of at most 100
      characters, no NaN/Infinity, no duplicate object keys, no trailing
      data);
    * ``unrecognized``: set but empty (REST shows nothing, so it would read
      back unset);
    * fields this schema version does not know (binary from a newer schema):
      REST has no key for them, so they would be lost; named ``#<number>``.

    Raises :class:`RunRejected` (``INVALID_ARGUMENT``, reason ``INVALID_RUN``)
    listing the violations, at most ``_status.MAX_VIOLATIONS`` of them (the
    message counts the others), so that any refusal fits in a gRPC status.
    Called by :func:`check_run`.
    """
    violations = _storable_violations(run)
    if violations:
        _reject(violations)


def _storable_violations(run: _pb.ProtectionShellInfo) -> list[tuple[str, str]]:
    violations: list[tuple[str, str]] = []
    has = run.HasField
    # The common record (well-formed HH:MM or none, enums set to a value or
    # unset, nothing unrecognized) costs a few reads: every check below
    # looks further only where the quick one fails.
    start, end = run.start_time_hhmm, run.end_time_hhmm
    if (start or has("start_time_hhmm")) and start not in _VALID_HHMM:
        violations.append(("startTimeHhmm", f'must be "HH:MM" (00:00 to 23:59), got {quote(start)}'))
    if (end or has("end_time_hhmm")) and end not in _VALID_HHMM:
        violations.append(("endTimeHhmm", f'must be "HH:MM" (00:00 to 23:59), got {quote(end)}'))
    unrecognized_set = has("unrecognized")
    if unrecognized_set or not run.status or not run.run_type:
        _enum_violations(run, "run_type", "runType", _RUN_TYPE_NAMES, violations)
        _enum_violations(run, "status", "status", _STATUS_NAMES, violations)
    if len(UnknownFieldSet(run)):
        for number, _ in _unknown_fields(run):
            violations.append((f"#{number}", "a field this schema version does not know: REST cannot carry it"))
    if not unrecognized_set:
        return violations
    unrecognized = run.unrecognized
    for number, _ in _unknown_fields(unrecognized):
        violations.append((f"unrecognized.#{number}", "a field this schema version does not know"))
    extras = unrecognized.extra_keys
    if not extras and not unrecognized.HasField("status") and not unrecognized.HasField("run_type"):
        violations.append(("unrecognized", "is set but empty: leave it unset"))
    seen: set[str] = set()
    for index, extra in enumerate(extras):
        key = extra.key
        shown = _key_name(key)
        where = f"unrecognized.extra_keys[{index}]"
        if key in _KNOWN_KEYS:
            violations.append((shown, f"{where} repeats a known REST key; set the field instead"))
        elif key in seen:
            violations.append((shown, f"{where} repeats a key given before it"))
        seen.add(key)
        for number, _ in _unknown_fields(extra):
            violations.append((shown, f"{where} has field #{number}, which this schema version does not know"))
        try:
            canonical(extra.json_value)
        except RestDecodeError as exc:
            violations.append((shown, f"{where}.json_value is not one JSON value within the limits: {exc.reason}"))
    return violations


def _unknown_fields(message: object) -> list[tuple[int, int]]:
    return [(field.field_number, field.wire_type) for field in UnknownFieldSet(message)]  # type: ignore[arg-type,attr-defined]


def _reject(violations: list[tuple[str, str]]) -> None:
    """Raise the refusal of ``violations``: the first ones, bounded as ``_status.bounded`` says, the rest counted."""
    message, shown = bounded("; ".join(f"{field} {text}" for field, text in violations[:MAX_VIOLATIONS]), violations)
    raise RunRejected("INVALID_ARGUMENT", REASON_INVALID_RUN, message, shown)


def check_run(run: _pb.ProtectionShellInfo | None) -> None:
    """Refuse a run that can never be accepted, whatever the stored state.

    A missing ``jobRunId``, an ``endTimeUsecs`` before ``startTimeUsecs`` and
    anything :func:`check_storable` refuses are ``INVALID_ARGUMENT``.
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
    if run is not None:
        violations += _storable_violations(run)
    if violations:
        _reject(violations)


def _status_text(run: _pb.ProtectionShellInfo) -> str:
    status = _shown_status(run)
    if status is None:
        return "unset"
    if isinstance(status, int):
        return _STATUS_NAMES.get(status, str(status))
    return quote(status)


def _same_status(a: _pb.ProtectionShellInfo, b: _pb.ProtectionShellInfo) -> bool:
    """Whether REST shows the same ``status`` for both runs."""
    sa, sb = _shown_status(a), _shown_status(b)
    # A known spelling in unrecognized.status (a record stored before
    # check_storable existed) shows as that status.
    return _STATUS_NUMBERS.get(sa, sa) == _STATUS_NUMBERS.get(sb, sb)  # type: ignore[arg-type]


def _extra_values(run: _pb.ProtectionShellInfo) -> dict[str, str] | None:
    """Unknown key -> canonical value, or None if a stored text is not valid JSON."""
    values: dict[str, str] = {}
    try:
        for extra in run.unrecognized.extra_keys:
            values.setdefault(extra.key, canonical(extra.json_value))
    except RestDecodeError:
        return None
    return values


def same_run(a: _pb.ProtectionShellInfo, b: _pb.ProtectionShellInfo) -> bool:
    """Whether two runs are the same record by value, as the service compares them.

    Equal messages are the same; beyond that, unknown keys
    (``unrecognized.extra_keys``) are compared as the members of a JSON
    object: by key, in any order, each value by its canonical JSON form
    (numbers by exact value, objects regardless of key order). So the same
    REST record written by Python (``1e-07``) and by Node (``1e-7``) is the
    same run.
    """
    if a == b:
        return True
    if not (a.HasField("unrecognized") and b.HasField("unrecognized")):
        return False
    ea, eb = a.unrecognized.extra_keys, b.unrecognized.extra_keys
    if not ea or len(ea) != len(eb):
        return False
    a2, b2 = _pb.ProtectionShellInfo(), _pb.ProtectionShellInfo()
    a2.CopyFrom(a)
    b2.CopyFrom(b)
    a2.unrecognized.ClearField("extra_keys")
    b2.unrecognized.ClearField("extra_keys")
    if a2 != b2:
        return False
    va, vb = _extra_values(a), _extra_values(b)
    return va is not None and va == vb and len(va) == len(ea)


def check_update(current: _pb.ProtectionShellInfo | None, new: _pb.ProtectionShellInfo) -> bool:
    """Decide whether ``new`` changes a run whose stored state is ``current``.

    Returns ``False`` when ``new`` is the same run as ``current`` by value
    (:func:`same_run`: a no-op that a retrying agent, or the same record
    written by another language, may cause), ``True`` when it is a change to
    record. Raises
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
    if same_run(current, new):
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
    an empty list matches everything. ``job_ids`` is checked against
    ``update.job.job_id``: a run published without a job id matches none.
    """
    if flt is None:
        return lambda update: True
    sources = frozenset(flt.sources)
    ids = frozenset(flt.job_run_ids)
    statuses = frozenset(flt.statuses)
    run_types = frozenset(flt.run_types)
    job_ids = frozenset(flt.job_ids)
    tests: list[Callable[[_svc.RunUpdate], bool]] = []
    if sources:
        tests.append(lambda u: u.source in sources)
    if ids:
        tests.append(lambda u: u.run.job_run_id in ids)
    if statuses:
        tests.append(lambda u: u.run.HasField("status") and u.run.status in statuses)
    if run_types:
        tests.append(lambda u: u.run.HasField("run_type") and u.run.run_type in run_types)
    if job_ids:
        # A run without a job id (no job, or a job without jobId) matches none.
        tests.append(lambda u: u.job.HasField("job_id") and u.job.job_id in job_ids)
    if not tests:
        return lambda update: True
    if len(tests) == 1:
        return tests[0]
    checks: Sequence[Callable[[_svc.RunUpdate], bool]] = tuple(tests)
    return lambda u: all(test(u) for test in checks)
