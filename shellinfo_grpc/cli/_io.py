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
from typing import Any, BinaryIO, Final, NoReturn, TextIO

__all__ = [
    "COMPACT",
    "DEFAULT_ADDRESS",
    "EXIT_BAD_INPUT",
    "EXIT_CALL_FAILED",
    "EXIT_OK",
    "INT64_MAX",
    "MAX_PAGE_SIZE",
    "MAX_SECONDS",
    "PROG",
    "Handler",
    "Parser",
    "Streams",
    "Subparsers",
    "command",
    "count",
    "job_run_id",
    "jsonl",
    "one_line",
    "page_size",
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

#: The largest value of an int64 (revisions, counts, retention): what the wire and the stores hold.
INT64_MAX: Final = 2**63 - 1
#: The most seconds a duration option takes (100 years): far beyond any use, and
#: within what deadlines and clocks can add to the time now.
MAX_SECONDS: Final = 100 * 365 * 86_400
#: The most runs one ListRuns call returns; the service caps larger pages at this.
MAX_PAGE_SIZE: Final = 1000


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: ``shellinfo CMD: error (see shellinfo CMD --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {one_line(message)} (see {self.prog} --help)\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # argparse drops a value that is "--" (as in --count=--) and then skips
        # the option's type: the option would hold [] instead of a number.
        if action.nargs is None and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings) or action.dest}: expected a value, got '--'")
        return super()._get_values(action, arg_strings)


def _integer(text: str, least: int, most: int, what: str) -> int:
    """An integer from ``least`` to ``most``, or an argparse error that says the range."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {one_line(repr(text))[:60]}") from None
    if not least <= value <= most:
        shown = text if len(text) <= 30 else text[:27] + "..."
        raise argparse.ArgumentTypeError(f"expected {what} from {least} to {most}, got {shown}")
    return value


def count(text: str) -> int:
    """An argparse type: an integer from 1 to INT64_MAX."""
    return _integer(text, 1, INT64_MAX, "an integer")


def whole(text: str) -> int:
    """An argparse type: an integer from 0 to INT64_MAX (a revision, a number of updates)."""
    return _integer(text, 0, INT64_MAX, "an integer")


def page_size(text: str) -> int:
    """An argparse type: runs per ListRuns call, 1 to MAX_PAGE_SIZE."""
    return _integer(text, 1, MAX_PAGE_SIZE, "a page size")


def seconds(text: str) -> float:
    """An argparse type: a number of seconds from 0 to MAX_SECONDS (nan and infinities refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {one_line(repr(text))[:60]}") from None
    if not 0 <= value <= MAX_SECONDS:  # also false for nan
        shown = text if len(text) <= 30 else text[:27] + "..."
        raise argparse.ArgumentTypeError(f"expected a number of seconds from 0 to {MAX_SECONDS}, got {shown}")
    return value


def job_run_id(text: str) -> int:
    """An argparse type: a jobRunId, any int64."""
    return _integer(text, -(2**63), INT64_MAX, "an integer jobRunId")


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
