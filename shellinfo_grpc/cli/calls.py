"""The client commands ``publish``, ``get`` and ``list``, and the connection options they share with ``watch``.

They talk to the service through :class:`shellinfo_grpc.client.RunUpdateClient`
and share ``--address`` (default ``$SHELLINFO_ADDRESS`` or ``127.0.0.1:50051``),
``--token`` (default ``$SHELLINFO_TOKEN``), ``--tls-ca``, ``--tls-cert``,
``--tls-key`` and ``--timeout``. A call that the service refuses or that fails
(a :class:`~shellinfo_grpc.errors.ServiceError`) exits with 1.

This module must not import grpc at import time: :func:`connect` imports the
client when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from shellinfo_grpc._gen.shellinfo.v1.protection_job_pb2 import ProtectionJob
from shellinfo_grpc._gen.shellinfo.v1.protection_shell_info_pb2 import ProtectionShellInfo, RunStatus, RunType
from shellinfo_grpc._gen.shellinfo.v1.run_update_service_pb2 import RunUpdate
from shellinfo_grpc.cli._io import (
    DEFAULT_ADDRESS,
    EXIT_BAD_INPUT,
    EXIT_CALL_FAILED,
    EXIT_OK,
    MAX_PAGE_SIZE,
    PROG,
    Streams,
    Subparsers,
    command,
    job_run_id,
    jsonl,
    one_line,
    page_size,
    quiet_grpc,
    seconds,
)
from shellinfo_grpc.cli._table import cells, describe, raw_dict, table, unshowable, update_dict
from shellinfo_grpc.cli.records import MAX_RECORD_BYTES, read_arguments, read_publish_input
from shellinfo_grpc.errors import (
    ConfigurationError,
    RestDecodeError,
    RunRejected,
    ServiceError,
)
from shellinfo_grpc.framing import write_all
from shellinfo_grpc.rest import rest_names, to_rest
from shellinfo_grpc.rules import check_run

if TYPE_CHECKING:
    from shellinfo_grpc.client import RunUpdateClient

__all__ = [
    "Match",
    "add_client_options",
    "add_filters",
    "add_get",
    "add_list",
    "add_publish",
    "add_table_format",
    "connect",
    "filter_options",
    "showable",
]


_STATUS_SPELLINGS: Final = tuple(rest_names(RunStatus.DESCRIPTOR).values())


_RUN_TYPE_SPELLINGS: Final = tuple(rest_names(RunType.DESCRIPTOR).values())


# --- client options -----------------------------------------------------------------


def add_client_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--address",
        default=os.environ.get("SHELLINFO_ADDRESS") or DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"the service, a gRPC target (default $SHELLINFO_ADDRESS, or {DEFAULT_ADDRESS})",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("SHELLINFO_TOKEN") or None,
        help="bearer token sent with every call (default $SHELLINFO_TOKEN); over plaintext only to a loopback address",
    )
    group.add_argument("--tls-ca", metavar="FILE", help="use TLS, trusting the server certificates this CA signs (PEM)")
    group.add_argument("--tls-cert", metavar="FILE", help="client certificate for mutual TLS (PEM); with --tls-key")
    group.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    group.add_argument(
        "--timeout",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long one call (publish, get, a page of list) may take (default %(default)s; 0: no limit)",
    )


def _job_id(text: str) -> int:
    """An argparse type: a jobId, any int64 (the check of ``job_run_id``, naming jobId)."""
    try:
        return job_run_id(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("jobRunId", "jobId")) from None


def add_table_format(parser: argparse.ArgumentParser, description: str) -> None:
    """The ``--format`` of list and watch: ``table`` (the default) or ``jsonl``."""
    parser.add_argument("--format", choices=("table", "jsonl"), default="table", help=description)


def add_filters(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("filters", "Each may be repeated (any of the values); different filters combine.")
    group.add_argument("--source", dest="sources", action="append", default=[], metavar="S", help="runs from source S")
    group.add_argument(
        "--job-run-id", dest="job_run_ids", action="append", default=[], type=job_run_id, metavar="N", help="run N"
    )
    group.add_argument(
        "--status", dest="statuses", action="append", default=[], metavar="kX", help="status, as in kSuccess"
    )
    group.add_argument(
        "--run-type", dest="run_types", action="append", default=[], metavar="kX", help="run type, as in kFull"
    )
    group.add_argument(
        "--job-id", dest="job_ids", action="append", default=[], type=_job_id, metavar="N", help="runs of job N (jobId)"
    )


#: Whether an update matches what the service's filter cannot express (None: everything matches).
Match = Callable[[RunUpdate], bool] | None


def _enum_filter(
    io: Streams, flag: str, values: Sequence[str], known: Sequence[str]
) -> tuple[list[str | int], frozenset[str | int] | None]:
    """What to send for one enum filter, and what to match here instead (or None).

    The wire filter takes enum numbers only. A spelling this version does not
    know (a newer cluster's status), or a number without a spelling, is kept
    by the service as the run shows it: the filter is then applied here, to
    the REST value, and the service is asked for every value of that field.
    """
    wanted: list[str | int] = []
    for value in values:
        text = value.strip()
        if text.lstrip("-").isdigit() and text.isascii():
            number = int(text)
            if not -(2**31) <= number < 2**31:
                raise ConfigurationError(f"{flag}: {text} is not an enum number (int32)")
            wanted.append(number)
        elif value in known:
            wanted.append(value)
        else:
            io.report(f"{PROG}: {flag} {value!r} is not a value this version knows; matching runs that show it as is")
            wanted.append(value)
    if all(isinstance(value, str) and value in known for value in wanted):
        return wanted, None
    return [], frozenset(wanted)


def filter_options(args: argparse.Namespace, io: Streams) -> tuple[dict[str, Any], Match]:
    """The filter keyword arguments of ``list`` and ``watch``, and the match applied on this side.

    Unknown spellings (and enum numbers) are matched here (see _enum_filter);
    a watch's resume point still moves with the service's progress, so
    skipping them here loses nothing.
    """
    sources = [_source(value) for value in args.sources]
    statuses, status_match = _enum_filter(io, "--status", args.statuses, _STATUS_SPELLINGS)
    run_types, type_match = _enum_filter(io, "--run-type", args.run_types, _RUN_TYPE_SPELLINGS)
    options = {
        "sources": sources,
        "job_run_ids": args.job_run_ids,
        "statuses": statuses,
        "run_types": run_types,
        "job_ids": args.job_ids,
    }
    if status_match is None and type_match is None:
        return options, None

    def match(update: RunUpdate) -> bool:
        try:
            rest = to_rest(update.run)
        except RestDecodeError:
            return True  # shown (skipped, with its reason) by the command
        if status_match is not None and rest.get("status") not in status_match:
            return False
        return type_match is None or rest.get("runType") in type_match

    return options, match


def connect(args: argparse.Namespace) -> RunUpdateClient:
    """A client for the connection options; options that cannot work raise ConfigurationError."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together: give both, or neither")
    if args.token is not None and not args.token.strip():
        raise ConfigurationError("--token: the token is empty")
    quiet_grpc()
    from shellinfo_grpc.client import RunUpdateClient, is_loopback  # noqa: PLC0415 - imports grpc

    tls = args.tls_ca is not None or args.tls_cert is not None
    if args.token is not None and not tls and not is_loopback(args.address):
        raise ConfigurationError(
            f"refusing to send the token to {args.address} in plaintext: use TLS (--tls-ca) or a loopback address"
        )
    return RunUpdateClient(
        args.address,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        timeout=args.timeout or None,
    )


# --- publish ----------------------------------------------------------------------

#: The longest ``source`` the service accepts, in bytes of UTF-8.
# TODO(server.MAX_SOURCE_BYTES): the server helper adds this limit to server.py, which imports
# grpc; the lead may move the constant to rules.py and import it here.
MAX_SOURCE_BYTES: Final = 256

_INT64_MAX: Final = 2**63 - 1


def _source(value: str, flag: str = "--source") -> str:
    """A source given on the command line: valid UTF-8 (argv may hold any bytes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(f"{flag}: not valid UTF-8: {value!r}") from None
    return value


def _describe_run(run: ProtectionShellInfo, source: str) -> str:
    job = str(run.job_run_id) if run.HasField("job_run_id") else "(none)"
    return f"jobRunId {job} (source {json.dumps(source, ensure_ascii=False)})"


def _job_text(run: ProtectionShellInfo) -> str:
    return f"jobRunId {run.job_run_id}" if run.HasField("job_run_id") else "no jobRunId"


def _service_problem(run: ProtectionShellInfo, source: str, job: ProtectionJob | None) -> str | None:
    """Why the service would refuse ``run`` whatever it stores (rules.check_run, the size limit), or None."""
    try:
        check_run(run)
    except RunRejected as exc:
        return "; ".join(f"{key}: {text}" for key, text in exc.violations)
    # The service's limit covers the update as stored and sent: run, source, job, revision and time.
    update = RunUpdate(source=source, run=run, revision=_INT64_MAX, accepted_time_usecs=_INT64_MAX)
    if job is not None:
        update.job.CopyFrom(job)
    size = update.ByteSize()
    if size > MAX_RECORD_BYTES:
        return f"the update is {size} bytes serialized (run, source and job); the service accepts {MAX_RECORD_BYTES}"
    return None


def _unknown_spellings(run: ProtectionShellInfo) -> list[str]:
    """The status and runType of ``run`` that this version has no spelling for (stored as they are)."""
    found = []
    rest = to_rest(run)
    for key, known in (("status", _STATUS_SPELLINGS), ("runType", _RUN_TYPE_SPELLINGS)):
        value = rest.get(key)
        if value is not None and value not in known:
            found.append(f"{key} {json.dumps(value, ensure_ascii=False)}")
    return found


def _ranges(numbers: Sequence[int]) -> str:
    """Record numbers as ``1, 3-5``."""
    parts: list[str] = []
    start = previous = None
    for number in [*numbers, None]:
        if number is not None and previous is not None and number == previous + 1:
            previous = number
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = number
    return ", ".join(parts)


def _cmd_publish(args: argparse.Namespace, io: Streams) -> int:
    """Publish REST ProtectionShellInfo objects, or ProtectionRunInstance objects (as GET protectionRuns
    answers them: the run in protectionShellInfo, published with its job's jobId, jobName and jobUid):
    each argument is one JSON object; without arguments, standard input holds a JSON array, one object,
    or one object per line (JSONL). All or nothing:
    every record is first checked as the service would check it (a valid REST object, jobRunId present,
    end not before start, the update at most 1 MiB, the source at most 256 bytes); if any is bad, each
    bad one is reported and nothing is published (exit status 2). A status or run type this version
    does not know is published as it is (use --strict to refuse it), with a warning. Then one line per
    record says its revision. The service may still refuse a record for what it has stored (a run
    whose status is final): each refused record is reported on standard error (its number, counted
    from 1, its jobRunId and the reason), then which records were recorded, and the exit status is 1.
    Empty input is no records: nothing is published, exit status 0.
    """
    source = _source(args.source)
    source_bytes = len(source.encode("utf-8"))
    if source_bytes > MAX_SOURCE_BYTES:
        raise ConfigurationError(
            f"--source: {source_bytes} bytes of UTF-8; the service accepts at most {MAX_SOURCE_BYTES}"
        )
    if args.records:
        records = read_arguments(args.records, args.strict)
    else:
        records = read_publish_input(io.stdin.read(), args.strict)
    if records.unreadable is not None:
        io.report(f"{PROG} publish: {records.unreadable}; nothing published")
        return EXIT_BAD_INPUT
    problems = list(records.problems)
    if not problems:
        for number, (run, job) in enumerate(zip(records.runs, records.jobs, strict=True), start=1):
            problem = _service_problem(run, source, job)
            if problem is not None:
                which = f" (jobRunId {run.job_run_id})" if run.HasField("job_run_id") else ""
                problems.append(f"record {number}{which}: {problem}")
    total = len(records.problems) + len(records.runs)
    if problems:
        for line in problems:
            io.report(one_line(line))
        io.report(f"{PROG} publish: nothing published ({len(problems)} of {total} records invalid)")
        return EXIT_BAD_INPUT
    runs, jobs = records.runs, records.jobs
    if not runs:
        io.report(f"{PROG} publish: no records in the input; nothing published")
        return EXIT_OK
    for number, run in enumerate(runs, start=1):
        unknown = _unknown_spellings(run)
        if unknown:
            io.report(
                f"{PROG} publish: warning: record {number} ({_job_text(run)}): {' and '.join(unknown)} unknown to this"
                " version; published as it is (--strict refuses it)"
            )

    recorded: list[int] = []
    refused: list[int] = []
    with connect(args) as client:

        def report(number: int, outcome: Any) -> None:
            run = runs[number - 1]
            if isinstance(outcome, ServiceError):
                refused.append(number)
                reason = f" {outcome.reason}" if outcome.reason else ""
                field = f" {outcome.field}:" if outcome.field else ""
                why = f"{outcome.code}{reason}{field} {outcome.message}"
                io.report(one_line(f"record {number} ({_job_text(run)}): refused: {why}"))
                if args.format == "jsonl":
                    error = {"code": outcome.code, "reason": outcome.reason, "message": outcome.message}
                    if outcome.field:
                        error["field"] = outcome.field
                    write_all(io.stdout, jsonl({"record": number, **_job(run), "error": error}))
                return
            recorded.append(number)
            if args.format == "jsonl":
                line = {"record": number, **_job(run), "revision": outcome.revision, "changed": outcome.changed}
                write_all(io.stdout, jsonl(line))
            else:
                change = "changed" if outcome.changed else "unchanged"
                text = f"{_describe_run(run, source)}: revision {outcome.revision}, {change}\n"
                write_all(io.stdout, text.encode())

        if len(runs) == 1:
            try:
                outcome: Any = client.publish(runs[0], source=source, job=jobs[0])
            except RunRejected as exc:
                outcome = exc
            report(1, outcome)
        else:
            done = 0
            try:
                items = ((source, run, job) for run, job in zip(runs, jobs, strict=True))
                for outcome in client.publish_many(items):
                    done += 1
                    report(done, outcome)
            except ServiceError as exc:
                io.stdout.flush()
                left = f"record {done + 1}" if done + 1 == len(runs) else f"records {done + 1}-{len(runs)}"
                io.report(one_line(f"{PROG}: {exc} ({left} not acknowledged: recorded or not)"))
                if done:
                    io.report(_summary(recorded, refused, done))
                return EXIT_CALL_FAILED
        io.stdout.flush()
    if refused:
        io.report(_summary(recorded, refused, len(runs)))
        return EXIT_CALL_FAILED
    return EXIT_OK


def _summary(recorded: list[int], refused: list[int], total: int) -> str:
    """Which records the service recorded, and which it refused."""
    kept = f"record{'s' if len(recorded) > 1 else ''} {_ranges(recorded)}" if recorded else "none"
    text = f"{PROG} publish: {len(recorded)} of {total} records recorded ({kept})"
    if refused:
        text += f"; refused: {_ranges(refused)}"
    return text


def _job(run: ProtectionShellInfo) -> dict[str, int | None]:
    return {"jobRunId": run.job_run_id if run.HasField("job_run_id") else None}


def add_publish(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    parser = command(subparsers, "publish", _cmd_publish, "publish run updates to the service")
    parser.add_argument("records", nargs="*", metavar="JSON", help="a REST JSON object")
    parser.add_argument("--source", default="", help="the source (cluster or agent) of the runs (default '')")
    parser.add_argument(
        "--strict", action="store_true", help="reject REST keys and enum values this schema version does not know"
    )
    parser.add_argument(
        "--format", choices=("text", "jsonl"), default="text", help="how to report each record (default text)"
    )
    add_client_options(parser)


# --- get and list -----------------------------------------------------------------


def _cmd_get(args: argparse.Namespace, io: Streams) -> int:
    """Print the latest update of one run as JSON: revision, source, acceptedTimeUsecs and the run in
    REST form. A run that does not exist is exit status 1. A stored run that cannot be shown in REST
    form (a bad record written before the service checked it) is printed raw, its bytes as
    runBase64, with one line on standard error, and the exit status is 1.
    """
    with connect(args) as client:
        update = client.get(args.job_run_id, source=_source(args.source))
    problem = unshowable(update)
    shown = update_dict(update) if problem is None else raw_dict(update)
    text = json.dumps(shown, ensure_ascii=False, indent=2) + "\n"
    write_all(io.stdout, text.encode())
    io.stdout.flush()
    if problem is not None:
        io.report(one_line(f"{PROG} get: {describe(update)} cannot be shown as REST: {problem}; shown raw (runBase64)"))
        return EXIT_CALL_FAILED
    return EXIT_OK


def add_get(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    parser = command(subparsers, "get", _cmd_get, "print the latest state of one run")
    parser.add_argument("job_run_id", type=job_run_id, metavar="JOB_RUN_ID", help="the run's jobRunId")
    parser.add_argument("--source", default="", help="the run's source (default '')")
    add_client_options(parser)


def _cmd_list(args: argparse.Namespace, io: Streams) -> int:
    """Print the latest update of every matching run, ordered by source and jobRunId. A stored run
    that cannot be shown in REST form (a bad record written before the service checked it) is
    skipped with one line on standard error; the others are still listed.
    """
    filters, match = filter_options(args, io)
    with connect(args) as client:
        updates = (u for u in client.list(**filters, page_size=args.page_size) if match is None or match(u))
        shown = (u for u in updates if showable(u, io, "list"))
        if args.format == "jsonl":
            for update in shown:
                write_all(io.stdout, jsonl(update_dict(update)))
        else:
            lines = table([cells(update) for update in shown])
            write_all(io.stdout, "".join(line + "\n" for line in lines).encode())
    io.stdout.flush()
    return EXIT_OK


def showable(update: RunUpdate, io: Streams, command: str) -> bool:
    """Whether ``update`` can be shown; if not, one line on standard error says so."""
    problem = unshowable(update)
    if problem is None:
        return True
    io.report(one_line(f"{PROG} {command}: skipped {describe(update)}: cannot be shown as REST: {problem}"))
    return False


def add_list(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    parser = command(subparsers, "list", _cmd_list, "print the latest state of every matching run")
    add_table_format(parser, "a table, or one JSON object per run as watch --format jsonl writes (default table)")
    parser.add_argument(
        "--page-size",
        type=page_size,
        default=100,
        metavar="N",
        help=f"runs fetched per call, 1 to {MAX_PAGE_SIZE} (default %(default)s)",
    )
    add_filters(parser)
    add_client_options(parser)
