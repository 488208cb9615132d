"""What every command shares: the standard streams, exit statuses, argparse types, writing.

Exit status: 0 on success; 2 for bad input or bad usage, including settings
that cannot work (a :class:`~shellinfo_grpc.errors.ConfigurationError`); 1 when
reading or writing fails, or when the service refuses or fails a call (a
:class:`~shellinfo_grpc.errors.ServiceError`); 130 on Ctrl-C; 141 (as for a
process killed by SIGPIPE) when standard output is closed early.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, TextIO, TypeVar

__all__ = [
    "COMPACT",
    "DEFAULT_ADDRESS",
    "EXIT_BAD_INPUT",
    "EXIT_CALL_FAILED",
    "EXIT_OK",
    "PROG",
    "Handler",
    "Streams",
    "Subparsers",
    "command",
    "count",
    "job_run_id",
    "jsonl",
    "one_line",
    "quiet_grpc",
    "seconds",
    "whole",
]


#: Exit statuses of a command (main() adds those of interruptions and I/O errors).
EXIT_OK: Final = 0
#: The service refused or failed a call (a ServiceError).
EXIT_CALL_FAILED: Final = 1
#: Bad input or bad usage (argparse uses 2 for the latter too).
EXIT_BAD_INPUT: Final = 2


#: Where the service listens, and where clients look for it, by default.
DEFAULT_ADDRESS: Final = "127.0.0.1:50051"


PROG: Final = "shellinfo"
COMPACT: Final = (",", ":")


_N = TypeVar("_N", int, float)

Subparsers = argparse._SubParsersAction  # argparse has no public name for it


@dataclass(frozen=True)
class Streams:
    """The standard streams a command reads and writes.

    :func:`main` fills in ``sys.stdin.buffer``, ``sys.stdout.buffer`` and
    ``sys.stderr`` for any it is not given, so that tests and embedding programs
    can run a command in-process on their own streams.
    """

    stdin: BinaryIO
    stdout: BinaryIO
    stderr: TextIO

    def report(self, line: str) -> None:
        """Write one line of diagnostics to standard error."""
        print(line, file=self.stderr)


#: What runs a command: ``handler(args, io)`` returns the exit status.
Handler = Callable[[argparse.Namespace, "Streams"], int]


def command(
    subparsers: Subparsers[argparse.ArgumentParser], name: str, handler: Handler, summary: str
) -> argparse.ArgumentParser:
    """Declare the subcommand ``name``; return its parser, for its arguments.

    ``summary`` is its line in ``shellinfo --help``; the docstring of
    ``handler`` is its description in ``shellinfo NAME --help``.
    """
    parser = subparsers.add_parser(name, help=summary, description=inspect.cleandoc(handler.__doc__ or ""))
    parser.set_defaults(handler=handler)
    return parser


# --- argument types ---------------------------------------------------------------


def _parsed(text: str, parse: Callable[[str], _N], expected: str) -> _N:
    try:
        return parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def count(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return value


def whole(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = _parsed(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 0, got {text!r}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0."""
    value = _parsed(text, float, "a number of seconds")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds of at least 0, got {text!r}")
    return value


def job_run_id(text: str) -> int:
    """An argparse type: a jobRunId, any int64."""
    value = _parsed(text, int, "an integer jobRunId")
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"jobRunId {text} is outside int64")
    return value


# --- text and output ---------------------------------------------------------------


def one_line(text: str) -> str:
    """Text for a one-line message: line breaks become spaces."""
    return " ".join(text.splitlines())


def jsonl(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=COMPACT).encode() + b"\n"


def quiet_grpc(verbosity: str = "NONE") -> None:
    """Keep gRPC's C core from writing its own log lines to standard error.

    Errors reach the user as one line each, from the exceptions; the core
    reads ``GRPC_VERBOSITY`` once, when grpc is first imported, so this must
    run before that (and cannot change a process that imported it already).
    A ``GRPC_VERBOSITY`` set by the user wins.
    """
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_VERBOSITY", verbosity)
