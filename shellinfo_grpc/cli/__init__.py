"""The ``shellinfo`` command line: the parser, and :func:`main`, which runs one command.

Each command lives in a module of this package: ``convert`` and ``validate``
(:mod:`~shellinfo_grpc.cli.convert`), ``serve`` (:mod:`~shellinfo_grpc.cli.serve`),
``publish``, ``get`` and ``list`` (:mod:`~shellinfo_grpc.cli.calls`), ``watch``
(:mod:`~shellinfo_grpc.cli.watch`), ``bridge`` and ``fake-cluster``
(:mod:`~shellinfo_grpc.cli.bridge`). What they share is in
:mod:`~shellinfo_grpc.cli._io` (streams, exit statuses, argparse types),
:mod:`~shellinfo_grpc.cli.records` (reading and writing record streams) and
:mod:`~shellinfo_grpc.cli._table` (how an update is shown).

Exit status: 0 on success; 2 for bad input or bad usage, including settings
that cannot work (a missing TLS or token file, a bad store URL, a port in use:
a :class:`~shellinfo_grpc.errors.ConfigurationError`); 1 when reading or
writing fails, or when the service refuses or fails a call (a
:class:`~shellinfo_grpc.errors.ServiceError`: a refused publish, a run not
found, a wrong token, no server); 130 on Ctrl-C; 141 (as for a process killed
by SIGPIPE), silently, when standard output is closed early. Every error is
one readable line on standard error, never a traceback.

Adding a command: in its module, write a handler ``_cmd_<name>(args, io) ->
int`` whose docstring is the command's description, and ``add_<name>(subparsers)``,
which declares it with :func:`~shellinfo_grpc.cli._io.command` and adds its
arguments; then list ``add_<name>`` in ``COMMANDS`` here. No module of this
package imports grpc at import time; a command that needs it imports it inside
its handler.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO, Final, TextIO, cast

from shellinfo_grpc import __version__
from shellinfo_grpc.cli._io import (
    EXIT_BAD_INPUT,
    EXIT_CALL_FAILED,
    EXIT_OK,
    PROG,
    Parser,
    Streams,
    Subparsers,
    one_line,
)
from shellinfo_grpc.cli.bridge import add_bridge, add_fake_cluster
from shellinfo_grpc.cli.calls import add_get, add_list, add_publish
from shellinfo_grpc.cli.convert import add_convert, add_validate
from shellinfo_grpc.cli.records import FORMATS
from shellinfo_grpc.cli.serve import add_serve
from shellinfo_grpc.cli.watch import add_watch
from shellinfo_grpc.errors import ServiceError, ShellInfoError

__all__ = [
    "COMMANDS",
    "EXIT_BAD_INPUT",
    "EXIT_BROKEN_PIPE",
    "EXIT_CALL_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_IO_ERROR",
    "EXIT_OK",
    "FORMATS",
    "Streams",
    "build_parser",
    "main",
]

#: Reading or writing failed (a read error, a full disk).
EXIT_IO_ERROR: Final = 1
#: Interrupted by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED: Final = 130
#: Standard output was closed before everything was written (128 + SIGPIPE).
EXIT_BROKEN_PIPE: Final = 141

#: The adders of the commands, in the order ``shellinfo --help`` lists them.
COMMANDS: Final[tuple[Callable[[Subparsers[argparse.ArgumentParser]], None], ...]] = (
    add_serve,
    add_publish,
    add_watch,
    add_get,
    add_list,
    add_convert,
    add_validate,
    add_bridge,
    add_fake_cluster,
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser: one subcommand for each entry of ``COMMANDS``.

    Each subcommand sets ``handler``, a ``(args, io: Streams) -> int`` function
    that :func:`main` calls.
    """
    parser = Parser(
        prog=PROG,
        description="Work with Cohesity ProtectionShellInfo records (shellinfo.v1): protection-run status.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    # Subcommands are Parsers too (argparse makes them of the parent's class): one-line usage errors.
    subparsers = cast(
        "Subparsers[argparse.ArgumentParser]",
        parser.add_subparsers(title="commands", metavar="COMMAND", required=True),
    )
    for add in COMMANDS:
        add(subparsers)
    return parser


def _silence_stdout() -> None:
    """After a broken pipe, point fd 1 at /dev/null so exit does not fail again flushing it."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # pragma: no cover - stdout without a descriptor
        pass


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the ``shellinfo`` command line and return its exit status.

    ``argv`` defaults to ``sys.argv[1:]``; the streams default to the process's
    own (binary standard input and output, text standard error). Usage errors,
    ``--help`` and ``--version`` are argparse's: they print to ``sys.stderr`` or
    ``sys.stdout`` and return 2 or 0 rather than exit.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_BAD_INPUT)
    err = stderr if stderr is not None else sys.stderr
    handler: Callable[[argparse.Namespace, Streams], int] = args.handler
    try:
        io = Streams(
            stdin if stdin is not None else _std_buffer(sys.stdin, "input"),
            stdout if stdout is not None else _std_buffer(sys.stdout, "output"),
            err,
        )
        return handler(args, io)
    except BrokenPipeError:
        if stdout is None:
            _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:  # a handler that writes flushes what it accepted first (see _cmd_convert)
        return EXIT_INTERRUPTED
    except ServiceError as exc:  # the service refused or failed a call
        print(f"{PROG}: {one_line(str(exc))}", file=err)
        return EXIT_CALL_FAILED
    except ShellInfoError as exc:  # bad input, or a setting that cannot work (ConfigurationError)
        print(f"{PROG}: {one_line(str(exc))}", file=err)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"{PROG}: I/O error: {exc}", file=err)
        return EXIT_IO_ERROR


def _std_buffer(stream: TextIO | None, what: str) -> BinaryIO:
    if stream is None:  # started with the descriptor closed
        raise OSError(f"standard {what} is closed")
    return stream.buffer


if __name__ == "__main__":
    sys.exit(main())
