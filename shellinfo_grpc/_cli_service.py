"""The service commands of the ``shellinfo`` command line: serve, publish, watch, get and list.

:mod:`shellinfo_grpc.cli` lists the adders of :data:`COMMANDS` among its own
commands; each adder declares a subcommand and its handler, a
``_cmd_<name>(args, io) -> int`` function as ``cli`` describes.

``shellinfo serve`` runs the run-update service (:func:`shellinfo_grpc.server.serve`)
until SIGTERM or SIGINT. On start it writes one line to standard error,
``shellinfo: serving on HOST:PORT (store URL)``, with the port actually bound
(so ``--address 127.0.0.1:0`` can be used and parsed).

The client commands (publish, watch, get, list) talk to it through
:class:`shellinfo_grpc.client.RunUpdateClient`. They share ``--address``
(default ``$SHELLINFO_ADDRESS`` or ``127.0.0.1:50051``), ``--token`` (default
``$SHELLINFO_TOKEN``), ``--tls-ca``, ``--tls-cert``, ``--tls-key`` and
``--timeout``.

Errors are one line on standard error and never a traceback. A setting that
cannot work (a bad flag value, a missing TLS file, a bad store URL, a port in
use) is reported here or by ``cli.main`` as a
:class:`~shellinfo_grpc.errors.ConfigurationError`: exit status 2, like bad
input. A call that the service refuses or that fails (a
:class:`~shellinfo_grpc.errors.ServiceError`) exits with 1.

Like ``cli``, this module must not import grpc at import time: the handlers
import the client and the server when they run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import queue
import select
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

from shellinfo_grpc._gen.shellinfo.v1.protection_shell_info_pb2 import ProtectionShellInfo, RunStatus, RunType
from shellinfo_grpc.errors import ConfigurationError, RestDecodeError, RunRejected, ServiceError
from shellinfo_grpc.framing import _write_all
from shellinfo_grpc.rest import from_rest, rest_names, to_rest
from shellinfo_grpc.store import Retention, default_store_url, open_store

if TYPE_CHECKING:
    from shellinfo_grpc._gen.shellinfo.v1.run_update_service_pb2 import RunUpdate
    from shellinfo_grpc.cli import Streams
    from shellinfo_grpc.client import RunUpdateClient, RunWatch, WatchEvent
    from shellinfo_grpc.server import RunningServer

__all__ = ["COMMANDS", "DEFAULT_ADDRESS"]

#: Where the service listens, and where clients look for it, by default.
DEFAULT_ADDRESS: Final = "127.0.0.1:50051"

# The exit statuses of shellinfo_grpc.cli (EXIT_*), repeated: cli imports this module.
_OK: Final = 0
_FAILED: Final = 1
_BAD_INPUT: Final = 2

_PROG: Final = "shellinfo"
_COMPACT: Final = (",", ":")
_BOM: Final = "\ufeff"

_STATUS_SPELLINGS: Final = tuple(rest_names(RunStatus.DESCRIPTOR).values())
_RUN_TYPE_SPELLINGS: Final = tuple(rest_names(RunType.DESCRIPTOR).values())

_Subparsers = argparse._SubParsersAction  # argparse has no public name for it


# --- argument types ---------------------------------------------------------------


def _count(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return value


def _whole(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds of at least 0, got {text!r}")
    return value


def _job_run_id(text: str) -> int:
    """An argparse type: a jobRunId, any int64."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer jobRunId, got {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"jobRunId {text} is outside int64")
    return value


def _one_line(text: str) -> str:
    """Text for a one-line message: line breaks become spaces."""
    return " ".join(text.splitlines())


def _check_spellings(flag: str, values: Sequence[str], known: Sequence[str]) -> None:
    for value in values:
        if value not in known:
            raise ConfigurationError(f"{flag}: unknown value {value!r}; expected one of {', '.join(known)}")


# --- grpc and logging ---------------------------------------------------------------


def _quiet_grpc(verbosity: str = "NONE") -> None:
    """Keep gRPC's C core from writing its own log lines to standard error.

    Errors reach the user as one line each, from the exceptions; the core
    reads ``GRPC_VERBOSITY`` once, when grpc is first imported, so this must
    run before that (and cannot change a process that imported it already).
    A ``GRPC_VERBOSITY`` set by the user wins.
    """
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_VERBOSITY", verbosity)


class _OneLineFormatter(logging.Formatter):
    """Log records as ``shellinfo: LEVEL: logger: message``, an exception as its type and text."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = f"{message} ({type(exc).__name__}: {exc})"
        return _one_line(f"{_PROG}: {record.levelname.lower()}: {record.name}: {message}")


@contextlib.contextmanager
def _logging_to(stream: Any, level: str) -> Iterator[None]:
    """Send log records of ``level`` and above to ``stream`` while the server runs.

    Below ``debug``, records are one line each, without tracebacks.
    """
    handler = logging.StreamHandler(stream)
    numeric = getattr(logging, level.upper())
    if numeric <= logging.DEBUG:
        handler.setFormatter(logging.Formatter(f"{_PROG}: %(levelname)s: %(name)s: %(message)s"))
    else:
        handler.setFormatter(_OneLineFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(numeric)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


# --- serve ----------------------------------------------------------------------


def _split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) as the host and the port."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigurationError(f"--address {address!r}: expected HOST:PORT, as in 127.0.0.1:50051 or [::1]:50051")
    return host, int(port_text)


def _check_port(address: str, host: str, port: int) -> None:
    """Fail early, in plain words, when ``address`` is in use or cannot be bound.

    gRPC says only "failed to bind"; this binds the way gRPC does
    (``SO_REUSEADDR``) and closes again. Port 0 always binds. gRPC listens on
    every address the host resolves to and needs one of them, so this does too.
    """
    if port == 0:
        return
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {address}: cannot resolve {name!r} ({exc.strerror})") from None
    problem: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                problem = problem or exc
            else:
                return
    if problem is not None:
        raise ConfigurationError(f"cannot listen on {address}: {(problem.strerror or str(problem)).lower()}")


def _shown_url(url: str) -> str:
    """A store URL fit for a log line: a password in it is masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def _cmd_serve(args: argparse.Namespace, io: Streams) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together: give both, or neither")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ConfigurationError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS works on top of TLS)")
    host, port = _split_address(args.address)
    url = args.store if args.store is not None else default_store_url()
    retention = Retention(max_updates=args.retain_updates, max_age_seconds=args.retain_seconds)

    _quiet_grpc("ERROR" if args.log_level == "debug" else "NONE")
    from shellinfo_grpc.server import ServerConfig, TlsConfig, load_tokens, serve  # noqa: PLC0415 - imports grpc

    tokens = load_tokens(Path(args.token_file)) if args.token_file is not None else frozenset()
    tls = None
    if args.tls_cert is not None:
        tls = TlsConfig(
            Path(args.tls_cert),
            Path(args.tls_key),
            Path(args.tls_client_ca) if args.tls_client_ca is not None else None,
        )
        tls.credentials()  # read the files now: a missing one is reported before the store is opened
    config = ServerConfig(max_watch_queue=args.max_watch_queue, tokens=tokens, tls=tls)
    store = open_store(url, retention=retention)
    _check_port(args.address, host, port)

    def started(running: RunningServer) -> None:
        # serve() calls this once its SIGTERM and SIGINT handlers are in place:
        # a signal sent on seeing this line shuts the server down gracefully.
        io.report(f"{_PROG}: serving on {host}:{running.port} (store {_shown_url(url)})")
        io.stderr.flush()

    with _logging_to(io.stderr, args.log_level):
        asyncio.run(serve(args.address, store, config, on_started=started))
    return _OK


def _add_serve(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the run-update service",
        description="Run the run-update gRPC service until SIGTERM or SIGINT, then shut down gracefully"
        " (exit status 0). On start, one line on standard error says the address actually bound and the store:"
        " 'shellinfo: serving on HOST:PORT (store URL)'.",
    )
    parser.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"where to listen (default {DEFAULT_ADDRESS}; port 0 picks a free port)",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="sqlite:///PATH (durable), memory:// (keeps nothing) or nats://HOST:PORT[,HOST:PORT...]"
        " (JetStream, for several replicas; see docs/deployment.md); default"
        " sqlite:///$XDG_STATE_HOME/shellinfo/runs.sqlite3, ~/.local/state/shellinfo/runs.sqlite3"
        " when XDG_STATE_HOME is unset",
    )
    parser.add_argument(
        "--token-file", metavar="FILE", help="require a bearer token from this file (one a line, # comments)"
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    parser.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="require client certificates signed by this CA (PEM): mutual TLS; needs --tls-cert and --tls-key",
    )
    parser.add_argument(
        "--retain-updates",
        type=_whole,
        default=Retention().max_updates,
        metavar="N",
        help="keep at most the newest N updates in the history (default %(default)s; 0: no limit);"
        " SQLite and memory stores always keep the latest state of every run, while on NATS a run"
        " whose last update falls out of the history is forgotten",
    )
    parser.add_argument(
        "--retain-seconds",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="drop updates older than S seconds from the history (default 0: no limit)",
    )
    parser.add_argument(
        "--max-watch-queue",
        type=_count,
        default=10_000,
        metavar="N",
        help="updates a watcher may fall behind before its stream is ended to resume (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        help="what the server logs to standard error (default %(default)s)",
    )
    parser.set_defaults(handler=_cmd_serve)


# --- client options -----------------------------------------------------------------


def _add_client_options(parser: argparse.ArgumentParser) -> None:
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
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long one call (publish, get, a page of list) may take (default %(default)s; 0: no limit)",
    )


def _add_filters(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("filters", "Each may be repeated (any of the values); different filters combine.")
    group.add_argument("--source", dest="sources", action="append", default=[], metavar="S", help="runs from source S")
    group.add_argument(
        "--job-run-id", dest="job_run_ids", action="append", default=[], type=_job_run_id, metavar="N", help="run N"
    )
    group.add_argument(
        "--status", dest="statuses", action="append", default=[], metavar="kX", help="status, as in kSuccess"
    )
    group.add_argument(
        "--run-type", dest="run_types", action="append", default=[], metavar="kX", help="run type, as in kFull"
    )


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    """The filter keyword arguments of ``list`` and ``watch``, spellings checked."""
    _check_spellings("--status", args.statuses, _STATUS_SPELLINGS)
    _check_spellings("--run-type", args.run_types, _RUN_TYPE_SPELLINGS)
    return {
        "sources": args.sources,
        "job_run_ids": args.job_run_ids,
        "statuses": args.statuses,
        "run_types": args.run_types,
    }


def _connect(args: argparse.Namespace) -> RunUpdateClient:
    """A client for the connection options; options that cannot work raise ConfigurationError."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together: give both, or neither")
    if args.token is not None and not args.token.strip():
        raise ConfigurationError("--token: the token is empty")
    _quiet_grpc()
    from shellinfo_grpc.client import RunUpdateClient, _is_loopback  # noqa: PLC0415 - imports grpc

    tls = args.tls_ca is not None or args.tls_cert is not None
    if args.token is not None and not tls and not _is_loopback(args.address):
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


# --- output -----------------------------------------------------------------------


def _update_dict(update: RunUpdate) -> dict[str, Any]:
    """One update as JSON: its revision, source, accepted time and the run in REST form."""
    return {
        "revision": update.revision,
        "source": update.source,
        "acceptedTimeUsecs": update.accepted_time_usecs,
        "run": to_rest(update.run),
    }


def _jsonl(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=_COMPACT).encode() + b"\n"


def _printable(text: str) -> str:
    """Text safe to put on a terminal: control characters (escape sequences, line breaks) become '?'."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


def _clip(text: str, width: int) -> str:
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


_COLUMNS: Final = (
    _Column("REVISION", 8, right=True),
    _Column("SOURCE", 12),
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


def _cells(update: RunUpdate) -> list[str]:
    rest = to_rest(update.run)
    return [
        str(update.revision),
        _clip(_printable(update.source), _SOURCE_WIDTH) or "-",
        str(rest.get("jobRunId", "-")),
        _printable(str(rest.get("runType", "-"))),
        _printable(str(rest.get("status", "-"))),
        _utc(rest.get("startTimeUsecs")),
        _utc(rest.get("endTimeUsecs")),
        _clip(_printable(rest.get("error", "")), _ERROR_WIDTH),
    ]


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    parts = [
        cell.rjust(width) if column.right else cell.ljust(width)
        for cell, width, column in zip(cells, widths, _COLUMNS, strict=True)
    ]
    return "  ".join(parts).rstrip()


def _widths(rows: Sequence[Sequence[str]]) -> list[int]:
    widths = [len(column.title) for column in _COLUMNS]
    for cells in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]
    widths[-1] = 0  # the last column is not padded
    return widths


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = _widths(rows)
    return [_row([c.title for c in _COLUMNS], widths), *(_row(cells, widths) for cells in rows)]


# --- publish ----------------------------------------------------------------------


@dataclass
class _Records:
    """Records read for publishing, or the lines that say why some could not be."""

    runs: list[ProtectionShellInfo]
    problems: list[str]  # one line per bad record
    unreadable: str | None = None  # the input as a whole cannot be read


def _decode(text: str, index: int, strict: bool, where: str = "") -> ProtectionShellInfo | str:
    """One REST JSON object from ``text``: the message, or the line that says what is wrong."""
    try:
        value = json.loads(text)
    except RecursionError:
        return f"record {index}: not usable JSON: nested too deeply{where}"
    except json.JSONDecodeError as exc:
        return f"record {index}: not valid JSON: {exc.msg} at column {exc.colno}{where}"
    except ValueError as exc:  # an integer with too many digits
        return f"record {index}: not usable JSON: {exc}{where}"
    return _convert(value, index, strict, where)


def _convert(value: Any, index: int, strict: bool, where: str = "") -> ProtectionShellInfo | str:
    try:
        return from_rest(value, strict=strict)
    except RestDecodeError as exc:
        return f"record {index}: {exc}{where}"


def _collect(items: Sequence[ProtectionShellInfo | str]) -> _Records:
    records = _Records([], [])
    for item in items:
        if isinstance(item, str):
            records.problems.append(item)
        else:
            records.runs.append(item)
    return records


def _read_stdin_records(data: bytes, strict: bool) -> _Records:
    """Records from standard input: a JSON array, one JSON object, or JSON Lines."""
    try:
        text = data.decode("utf-8").removeprefix(_BOM)
    except UnicodeDecodeError as exc:
        return _Records([], [], f"input is not valid UTF-8: {exc.reason} (byte offset {exc.start})")
    stripped = text.strip()
    if not stripped:
        return _Records([], [])
    if stripped.startswith("["):
        try:
            array = json.loads(stripped)
        except RecursionError:
            return _Records([], [], "input is not usable JSON: it is nested too deeply")
        except ValueError as exc:
            return _Records([], [], f"input is not valid JSON: {exc}")
        if not isinstance(array, list):  # pragma: no cover - text that starts with [ and parses is an array
            return _Records([], [], "input is not a JSON array")
        return _collect([_convert(value, i, strict) for i, value in enumerate(array)])
    try:
        whole = json.loads(stripped)
    except RecursionError:
        return _Records([], [], "input is not usable JSON: it is nested too deeply")
    except ValueError:
        pass  # not one JSON value: JSON Lines, or bad input that the line-by-line reading pinpoints
    else:
        return _collect([_convert(whole, 0, strict)])
    items: list[ProtectionShellInfo | str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            items.append(_decode(line, len(items), strict, f" (line {number})"))
    return _collect(items)


def _describe_run(run: ProtectionShellInfo, source: str) -> str:
    job = str(run.job_run_id) if run.HasField("job_run_id") else "(none)"
    return f"jobRunId {job} (source {json.dumps(source, ensure_ascii=False)})"


def _refusal(index: int, exc: ServiceError) -> str:
    field = f" {exc.field}" if exc.field else ""
    return _one_line(f"record {index}: {exc.code}{field}: {exc.message}")


def _cmd_publish(args: argparse.Namespace, io: Streams) -> int:
    if args.records:
        records = _collect([_decode(text, i, args.strict) for i, text in enumerate(args.records)])
    else:
        records = _read_stdin_records(io.stdin.read(), args.strict)
    if records.unreadable is not None:
        io.report(f"{_PROG} publish: {records.unreadable}; nothing published")
        return _BAD_INPUT
    if records.problems:
        for line in records.problems:
            io.report(line)
        bad = len(records.problems)
        io.report(f"{_PROG} publish: nothing published ({bad} of {bad + len(records.runs)} records invalid)")
        return _BAD_INPUT
    if not records.runs:
        io.report(f"{_PROG} publish: no records: give REST JSON objects as arguments or on standard input")
        return _BAD_INPUT

    runs = records.runs
    refused = 0
    with _connect(args) as client:

        def report(index: int, outcome: Any) -> None:
            nonlocal refused
            run = runs[index]
            if isinstance(outcome, ServiceError):
                refused += 1
                io.report(_refusal(index, outcome))
                if args.format == "jsonl":
                    error = {"code": outcome.code, "reason": outcome.reason, "message": outcome.message}
                    if outcome.field:
                        error["field"] = outcome.field
                    _write_all(io.stdout, _jsonl({"index": index, **_job(run), "error": error}))
            elif args.format == "jsonl":
                line = {"index": index, **_job(run), "revision": outcome.revision, "changed": outcome.changed}
                _write_all(io.stdout, _jsonl(line))
            else:
                change = "changed" if outcome.changed else "unchanged"
                text = f"{_describe_run(run, args.source)}: revision {outcome.revision}, {change}\n"
                _write_all(io.stdout, text.encode())

        if len(runs) == 1:
            try:
                outcome: Any = client.publish(runs[0], source=args.source)
            except RunRejected as exc:
                outcome = exc
            report(0, outcome)
        else:
            done = 0
            try:
                for outcome in client.publish_many(runs, source=args.source):
                    report(done, outcome)
                    done += 1
            except ServiceError as exc:
                io.stdout.flush()
                left = f"record {done}" if done == len(runs) - 1 else f"records {done} to {len(runs) - 1}"
                io.report(_one_line(f"{_PROG}: {exc} ({left} not acknowledged)"))
                return _FAILED
        io.stdout.flush()
    return _FAILED if refused else _OK


def _job(run: ProtectionShellInfo) -> dict[str, int | None]:
    return {"jobRunId": run.job_run_id if run.HasField("job_run_id") else None}


def _add_publish(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "publish",
        help="publish run updates to the service",
        description="Publish REST ProtectionShellInfo objects: each argument is one JSON object; without"
        " arguments, standard input holds a JSON array, one object, or one object per line (JSONL)."
        " Every record is checked first: if any is bad, each bad one is reported and nothing is published"
        " (exit status 2). Then one line per record says its revision; a refused record is reported on"
        " standard error and makes the exit status 1.",
    )
    parser.add_argument("records", nargs="*", metavar="JSON", help="a REST JSON object")
    parser.add_argument("--source", default="", help="the source (cluster or agent) of the runs (default '')")
    parser.add_argument(
        "--strict", action="store_true", help="reject REST keys and enum values this schema version does not know"
    )
    parser.add_argument(
        "--format", choices=("text", "jsonl"), default="text", help="how to report each record (default text)"
    )
    _add_client_options(parser)
    parser.set_defaults(handler=_cmd_publish)


# --- get and list -----------------------------------------------------------------


def _cmd_get(args: argparse.Namespace, io: Streams) -> int:
    with _connect(args) as client:
        update = client.get(args.job_run_id, source=args.source)
    text = json.dumps(_update_dict(update), ensure_ascii=False, indent=2) + "\n"
    _write_all(io.stdout, text.encode())
    io.stdout.flush()
    return _OK


def _add_get(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "get",
        help="print the latest state of one run",
        description="Print the latest update of one run as JSON: revision, source, acceptedTimeUsecs and the run"
        " in REST form. A run that does not exist is exit status 1.",
    )
    parser.add_argument("job_run_id", type=_job_run_id, metavar="JOB_RUN_ID", help="the run's jobRunId")
    parser.add_argument("--source", default="", help="the run's source (default '')")
    _add_client_options(parser)
    parser.set_defaults(handler=_cmd_get)


def _cmd_list(args: argparse.Namespace, io: Streams) -> int:
    filters = _filters(args)
    with _connect(args) as client:
        updates = client.list(**filters, page_size=args.page_size)
        if args.format == "jsonl":
            for update in updates:
                _write_all(io.stdout, _jsonl(_update_dict(update)))
        else:
            lines = _table([_cells(update) for update in updates])
            _write_all(io.stdout, "".join(line + "\n" for line in lines).encode())
    io.stdout.flush()
    return _OK


def _add_list(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "list",
        help="print the latest state of every matching run",
        description="Print the latest update of every matching run, ordered by source and jobRunId.",
    )
    parser.add_argument(
        "--format",
        choices=("table", "jsonl"),
        default="table",
        help="a table, or one JSON object per run as watch --format jsonl writes (default table)",
    )
    parser.add_argument(
        "--page-size", type=_count, default=100, metavar="N", help="runs fetched per call (default %(default)s)"
    )
    _add_filters(parser)
    _add_client_options(parser)
    parser.set_defaults(handler=_cmd_list)


# --- watch ------------------------------------------------------------------------

_END: Final = object()


class _Pump:
    """Iterates a watch on a thread, so that the command's thread can wait with a timeout.

    Each update goes out as ``(event, reconnects)``: the watch's reconnect
    count when it was delivered, so that notices say when it resumed. The
    watch's end is ``_END``; its error, the exception.
    """

    def __init__(self, watch: RunWatch) -> None:
        self._watch = watch
        self._closed = threading.Event()
        self.items: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self._thread = threading.Thread(target=self._run, name="shellinfo-watch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._closed.is_set():
            try:
                self.items.put(item, timeout=0.1)
            except queue.Full:
                continue
            return True
        return False

    def _run(self) -> None:
        try:
            for event in self._watch:
                if not self._put((event, self._watch.reconnects)):
                    return
        except BaseException as exc:  # handed to the command's thread
            self._put(exc)
        else:
            self._put(_END)

    def close(self) -> None:
        self._closed.set()
        self._watch.close()
        self._thread.join(2.0)


class _View(Protocol):
    """How watch shows what it receives."""

    live: bool

    def event(self, event: WatchEvent) -> None: ...

    def idle(self) -> None:
        """Nothing more is at hand: show what was received."""

    def notice(self, text: str | None) -> None:
        """A notice about the connection (``None``: the last one is over)."""

    def close(self) -> None: ...


class _JsonlView:
    """One JSON line per update, and one for the end of the snapshot."""

    live = False

    def __init__(self, io: Streams) -> None:
        self._io = io

    def event(self, event: WatchEvent) -> None:
        if event.update is None:
            line = _jsonl({"snapshotComplete": True, "revision": event.revision})
        else:
            line = _jsonl(_update_dict(event.update))
        _write_all(self._io.stdout, line)

    def idle(self) -> None:
        self._io.stdout.flush()

    def notice(self, text: str | None) -> None:
        if text is not None:
            self._io.report(text)

    def close(self) -> None:
        self.idle()


class _RowsView(_JsonlView):
    """A header, then one table row per update, appended."""

    _WIDTHS: Final = [column.width for column in _COLUMNS]

    def __init__(self, io: Streams) -> None:
        super().__init__(io)
        self._write(_row([c.title for c in _COLUMNS], self._WIDTHS))
        self.idle()

    def _write(self, line: str) -> None:
        _write_all(self._io.stdout, (line + "\n").encode())

    def event(self, event: WatchEvent) -> None:
        if event.update is None:
            self._write(f"-- snapshot complete at revision {event.revision}; live updates follow --")
        else:
            self._write(_row(_cells(event.update), self._WIDTHS))


class _LiveView:
    """A table redrawn in place on a terminal: the latest state of each run, most recently updated first."""

    live = True
    _INTERVAL: Final = 0.1  # seconds between redraws while updates pour in

    def __init__(self, io: Streams, address: str) -> None:
        self._out = io.stdout
        self._address = address
        self._runs: dict[tuple[str, int | None], RunUpdate] = {}
        self._updates = 0
        self._revision: int | None = None
        self._snapshot = ""
        self._notice: str | None = None
        self._drawn = 0.0
        self._dirty = True
        self._size = shutil.get_terminal_size()
        _write_all(self._out, b"\x1b[?25l\x1b[2J")  # hide the cursor, clear the screen
        self._draw()

    def event(self, event: WatchEvent) -> None:
        self._revision = event.revision
        if event.update is None:
            self._snapshot = "snapshot complete"
        else:
            run = event.update.run
            self._runs[(event.update.source, run.job_run_id if run.HasField("job_run_id") else None)] = event.update
            self._updates += 1
        self._dirty = True
        if time.monotonic() - self._drawn >= self._INTERVAL:
            self._draw()

    def idle(self) -> None:
        if self._dirty or shutil.get_terminal_size() != self._size:
            self._draw()

    def notice(self, text: str | None) -> None:
        self._notice = text
        self._dirty = True

    def _draw(self) -> None:
        self._size = shutil.get_terminal_size()
        columns, lines = self._size
        latest = sorted(self._runs.values(), key=lambda u: u.revision, reverse=True)
        room = max(lines - 3, 0)  # the status line, the header, and the line the cursor rests on
        rows = [_cells(update) for update in latest[:room]]
        revision = "-" if self._revision is None else str(self._revision)
        status = f"{_PROG} watch {self._address}  revision {revision}  {len(self._runs)} runs  {self._updates} updates"
        if self._snapshot:
            status += f"  ({self._snapshot})"
        if len(latest) > room:
            status += f"  [{len(latest) - room} more not shown]"
        if self._notice:
            status += f"  [{self._notice}]"
        screen = [_clip(status, columns), *(_clip(line, columns) for line in _table(rows))]
        _write_all(self._out, ("\x1b[H" + "\x1b[K\n".join(screen) + "\x1b[K\x1b[J").encode())
        self._out.flush()
        self._drawn = time.monotonic()
        self._dirty = False

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._draw()
            _write_all(self._out, b"\n\x1b[?25h")  # show the cursor again
            self._out.flush()


class _Notices:
    """Says when a watch loses its connection and when it resumes; a watch from now, where it starts."""

    def __init__(self, watch: RunWatch, view: _View, *, from_now: bool, address: str) -> None:
        self._watch = watch
        self._view = view
        self._from_now = from_now
        self._address = address
        self._reconnects = 0
        self._outage: str | None = None  # the last error reported, while reconnecting

    def poll(self, first_update: int | None) -> None:
        """Check the watch for news (reconnects, where a watch from now starts)."""
        if self._from_now:
            start = self._watch.resume_revision
            if start is not None or first_update is not None:
                self._from_now = False
                if not self._view.live:
                    begin = first_update if first_update is not None else start
                    self._view.notice(f"{_PROG} watch: watching {self._address} from revision {begin}")
        reconnects = self._watch.reconnects
        if reconnects == self._reconnects:
            return
        self._reconnects = reconnects
        error = self._watch.last_error
        text = _one_line(str(error)) if error is not None else "the connection was lost"
        if text != self._outage:
            self._outage = text
            if self._view.live:
                self._view.notice(f"reconnecting: {text}")
            else:
                self._view.notice(f"{_PROG} watch: {text}; reconnecting (nothing will be missed or repeated)")

    def delivered(self, event: WatchEvent, reconnects: int) -> None:
        """An event came; if it came after the last reconnect, the outage is over."""
        if self._outage is not None and reconnects >= self._reconnects:
            self._outage = None
            if self._view.live:
                self._view.notice(None)
            else:
                self._view.notice(f"{_PROG} watch: resumed at revision {event.revision}")


def _cmd_watch(args: argparse.Namespace, io: Streams) -> int:
    filters = _filters(args)
    if args.snapshot and args.from_revision:
        raise ConfigurationError("--snapshot starts from now: it does not go with --from-revision")
    with _connect(args) as client:
        watch = client.watch(**filters, start_revision=args.from_revision, include_snapshot=args.snapshot)
        pump = _Pump(watch)
        view: _View
        if args.format == "jsonl":
            view = _JsonlView(io)
        elif io.stdout.isatty():
            view = _LiveView(io, args.address)
        else:
            view = _RowsView(io)
        notices = _Notices(watch, view, from_now=not (args.from_revision or args.snapshot), address=args.address)
        try:
            return _follow(pump, notices, view, args.count, _reader_gone(io.stdout))
        finally:
            pump.close()
            view.close()


def _reader_gone(stream: Any) -> Callable[[], bool]:
    """A check of whether the reader of a pipe on ``stream`` has gone (``watch ... | head -3``).

    A watch writes only when updates come; without this, one that waits for
    the next update would notice only then that nobody reads any more.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (tests' in-memory streams)
        return lambda: False
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
    return lambda: bool(poller.poll(0))


def _follow(pump: _Pump, notices: _Notices, view: _View, count: int | None, gone: Callable[[], bool]) -> int:
    updates = 0
    first: int | None = None
    while True:
        notices.poll(first)
        try:
            item = pump.items.get(timeout=0.1)
        except queue.Empty:
            view.idle()
            if gone():
                raise BrokenPipeError("standard output was closed") from None
            continue
        if item is _END:
            return _OK
        if isinstance(item, BaseException):
            raise item
        event, reconnects = item
        notices.delivered(event, reconnects)
        view.event(event)
        if event.update is not None:
            updates += 1
            if first is None:
                first = event.revision
            if count is not None and updates >= count:
                return _OK
        if pump.items.empty():
            view.idle()


def _add_watch(subparsers: _Subparsers[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="follow run updates live",
        description="Print run updates as the service accepts them; resume by itself, without missing or"
        " repeating an update, when the connection is lost or the server restarts (a notice goes to standard"
        " error). On a terminal, the table is redrawn in place: the latest state of each run, most recently"
        " updated first. Ctrl-C stops (exit status 130).",
    )
    parser.add_argument(
        "--format",
        choices=("table", "jsonl"),
        default="table",
        help="a table, or one JSON object per update: {revision, source, acceptedTimeUsecs, run} and"
        " {snapshotComplete, revision} after a snapshot (default table)",
    )
    parser.add_argument(
        "--from-revision",
        type=_whole,
        default=0,
        metavar="N",
        help="start at revision N, inclusive: the history first, then live (default 0: from now)",
    )
    parser.add_argument(
        "--snapshot", action="store_true", help="first the latest state of every matching run, then live"
    )
    parser.add_argument("--count", type=_count, metavar="N", help="exit (status 0) after N updates")
    _add_filters(parser)
    _add_client_options(parser)
    parser.set_defaults(handler=_cmd_watch)


#: The adders of the service commands, in the order ``shellinfo --help`` lists them.
COMMANDS: Final[tuple[Callable[[_Subparsers[argparse.ArgumentParser]], None], ...]] = (
    _add_serve,
    _add_publish,
    _add_watch,
    _add_get,
    _add_list,
)
