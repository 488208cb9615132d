"""What every command shares: the standard streams, exit statuses, argparse types, writing.

Exit status: 0 on success; 2 for bad input or bad usage, including settings
that cannot work (a :class:`~shellinfo_grpc.errors.ConfigurationError`); 1 when
reading or writing fails, or when the service refuses or fails a call (a
:class:`~shellinfo_grpc.errors.ServiceError`); 130 on Ctrl-C; 141 (as for a
process killed by SIGPIPE) when standard output is closed early.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, TextIO

__all__ = [
    "COMPACT",
    "DEFAULT_ADDRESS",
    "EXIT_BAD_INPUT",
    "EXIT_BROKEN_PIPE",
    "EXIT_CALL_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_IO_ERROR",
    "EXIT_OK",
    "PROG",
    "Streams",
    "Subparsers",
    "count",
    "job_run_id",
    "jsonl",
    "one_line",
    "quiet_grpc",
    "seconds",
    "whole",
]


EXIT_OK: Final = 0


#: Reading or writing failed (a read error, a full disk).
EXIT_IO_ERROR: Final = 1


#: The service refused or failed a call (a ServiceError).
EXIT_CALL_FAILED: Final = 1


#: Bad input or bad usage (argparse uses 2 for the latter too).
EXIT_BAD_INPUT: Final = 2


#: Interrupted by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED: Final = 130


#: Standard output was closed before everything was written (128 + SIGPIPE).
EXIT_BROKEN_PIPE: Final = 141


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


# --- argument types ---------------------------------------------------------------


def count(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return value


def whole(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 0, got {text!r}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds of at least 0, got {text!r}")
    return value


def job_run_id(text: str) -> int:
    """An argparse type: a jobRunId, any int64."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer jobRunId, got {text!r}") from None
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
