"""``shellinfo convert`` and ``shellinfo validate``: the record commands, without a service.

``convert`` turns a stream of ``ProtectionShellInfo`` records from one form
into another (see :mod:`shellinfo_grpc.cli.records`); ``validate`` checks every
record of such a stream and reports each bad one. Both read standard input and
write standard output, and stream: each record is converted and written before
the next is read, so a bad record stops ``convert`` with everything before it
already written (nothing already accepted is lost), and a live pipe is passed
through as it arrives.
"""

from __future__ import annotations

import argparse

from shellinfo_grpc.cli._io import EXIT_BAD_INPUT, EXIT_OK, PROG, Streams, command
from shellinfo_grpc.cli.records import FORMATS, READERS, Bad, Input, Writer, nothing

__all__ = ["add_convert", "add_validate"]


def _cmd_convert(args: argparse.Namespace, io: Streams) -> int:
    """Read records from standard input and write them to standard output in another format. Records
    are written as they are read; at the first bad record, the ones before it are written, the error
    is reported on standard error and the exit status is 2.

    Every format is decided alike, with the same limits: a record is valid when its REST form reads
    back as the same message, it is at most 1 MiB serialized, a value kept for an unknown key nests at
    most 64 deep, and one record's input (a JSON line, a binary frame) is at most 8 MiB. Records are
    numbered from 1. Empty input is no records (exit status 0).
    """
    writer = Writer(io.stdout, args.to_format)
    bad: Bad | None = None
    try:
        for item in READERS[args.from_format](Input(io.stdin, writer.flush), args.strict):
            if isinstance(item, Bad):
                bad = item
                break
            writer.write(item)
    except KeyboardInterrupt:
        writer.close()  # keep what was accepted
        raise
    writer.close()  # what was accepted is out before the error is reported
    if bad is None:
        return EXIT_OK
    io.report(f"{PROG} convert: {bad.message}")
    return EXIT_BAD_INPUT


def _cmd_validate(args: argparse.Namespace, io: Streams) -> int:
    """Read records from standard input and report each bad one on standard error, then a summary. Exit
    status 0 if every record is valid (empty input: no records), 2 otherwise. The rules and limits are
    those of convert (and publish), the same in every format: see shellinfo convert --help.
    """
    total = bad = 0
    stopped = None
    for item in READERS[args.from_format](Input(io.stdin, nothing), args.strict):
        if isinstance(item, Bad):
            if not item.record:
                io.report(f"{PROG} validate: {item.message}")
                return EXIT_BAD_INPUT
            bad += 1
            io.report(item.message)
            if item.fatal:
                stopped = total + 1
        total += 1
    summary = f"{bad} of {total} records invalid"
    if stopped is not None:
        summary += f" (reading stopped at record {stopped}: the input after it cannot be framed)"
    io.report(summary)
    return EXIT_BAD_INPUT if bad else EXIT_OK


def _add_format(parser: argparse.ArgumentParser, flag: str, dest: str, what: str) -> None:
    parser.add_argument(flag, dest=dest, required=True, choices=FORMATS, help=f"format of {what}")


def _add_strict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strict",
        action="store_true",
        help="reject REST keys, enum values and (binary) fields this schema version does not know,"
        " instead of keeping them",
    )


def add_convert(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = command(subparsers, "convert", _cmd_convert, "convert records between json, jsonl and binary")
    _add_format(parser, "--from", "from_format", "standard input")
    _add_format(parser, "--to", "to_format", "standard output")
    _add_strict(parser)


def add_validate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = command(subparsers, "validate", _cmd_validate, "check every record and report the bad ones")
    _add_format(parser, "--from", "from_format", "standard input")
    _add_strict(parser)
