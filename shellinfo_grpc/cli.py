"""The ``shellinfo`` command line.

``shellinfo convert`` turns a stream of ``ProtectionShellInfo`` records from
one form into another: ``json`` (one JSON array of REST objects, as the
Cohesity REST API returns them), ``jsonl`` (one REST object per line) or
``binary`` (length-delimited protobuf, see :mod:`shellinfo_grpc.framing`).
``shellinfo validate`` checks every record of such a stream and reports each
bad one.

Both read standard input and write standard output, and stream: each record is
converted and written before the next is read, so a bad record stops
``convert`` with everything before it already written (nothing already
accepted is lost), and a live pipe is passed through as it arrives.

The service commands, ``serve``, ``publish``, ``watch``, ``get`` and
``list``, live in :mod:`shellinfo_grpc._cli_service`.

Exit status: 0 on success; 2 for bad input or bad usage, including settings
that cannot work (a missing TLS or token file, a bad store URL, a port in use:
a :class:`~shellinfo_grpc.errors.ConfigurationError`); 1 when reading or
writing fails, or when the service refuses or fails a call (a
:class:`~shellinfo_grpc.errors.ServiceError`: a refused publish, a run not
found, a wrong token, no server); 130 on Ctrl-C; 141 (as for a process killed
by SIGPIPE), silently, when standard output is closed early. Every error is
one readable line on standard error, never a traceback.

Adding a command: write ``_add_<name>(subparsers)``, which declares its
arguments and sets ``handler=_cmd_<name>``, and ``_cmd_<name>(args, io) ->
int``, and list ``_add_<name>`` in ``_COMMANDS``. This module must not import
grpc at import time; a command that needs it imports it inside its handler.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Final, TextIO

from google.protobuf.unknown_fields import UnknownFieldSet

from shellinfo_grpc import __version__
from shellinfo_grpc._cli_service import COMMANDS as _SERVICE_COMMANDS
from shellinfo_grpc._gen.shellinfo.v1.protection_shell_info_pb2 import ProtectionShellInfo
from shellinfo_grpc.errors import FramingError, RestDecodeError, ServiceError, ShellInfoError
from shellinfo_grpc.framing import _write_all, encode_delimited, iter_frames
from shellinfo_grpc.rest import from_rest, rest_names, to_rest

__all__ = [
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

#: The record stream formats ``--from`` and ``--to`` accept.
FORMATS: Final = ("json", "jsonl", "binary")

_PROG: Final = "shellinfo"
_COMPACT: Final = (",", ":")
_CHUNK: Final = 64 * 1024
_BOM: Final = b"\xef\xbb\xbf"
_JSON_BLANK: Final = b" \t\r"  # what JSON counts as whitespace, besides the newline that ends a line


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


# --- reading ------------------------------------------------------------------


@dataclass(frozen=True)
class _Bad:
    """A record, or the whole input, that could not be read.

    ``message`` is the one line to report. ``fatal``: nothing after it can be
    read. ``record``: it stands for one record (``validate`` counts it); when
    false, the input as a whole is unreadable (not JSON at all, say).
    """

    message: str
    fatal: bool = False
    record: bool = True


_Item = ProtectionShellInfo | _Bad


class _Input:
    """Standard input, with a hook run before every read that may block.

    ``convert`` passes its writer's ``flush`` as the hook: converted records
    gather in the output buffer while input is at hand, and go out in one write
    before the command waits for more. That is efficient for files, and never
    holds back the records of a live pipe.
    """

    def __init__(self, stdin: BinaryIO, before_read: Callable[[], None]) -> None:
        self._stdin = stdin
        # read1 returns what is at hand rather than waiting for a full chunk.
        self._read: Callable[[int], bytes] = getattr(stdin, "read1", stdin.read)
        self._before_read = before_read

    def read(self, size: int = -1, /) -> bytes:
        """Read up to ``size`` bytes, whatever is at hand (at least one unless at the end)."""
        self._before_read()
        return self._read(size)

    def read_all(self) -> bytes:
        """Read everything up to the end of the input."""
        self._before_read()
        return self._stdin.read()


def _nothing() -> None:
    """The read hook of commands that write nothing to standard output."""


def _describe(value: object) -> str:
    """Name the kind of a top-level JSON value that is not an array."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


def _not_utf8(exc: UnicodeDecodeError, where: str) -> str:
    return f"{where} is not valid UTF-8: {exc.reason} (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"


def _read_json(source: _Input, strict: bool) -> Iterator[_Item]:
    """Records of one JSON array; the whole input must be read before the first."""
    data = source.read_all()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield _Bad(_not_utf8(exc, "input"), fatal=True, record=False)
        return
    try:
        array = json.loads(text)
    except RecursionError:
        yield _Bad("input is not usable JSON: it is nested too deeply", fatal=True, record=False)
        return
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        yield _Bad(f"input is not valid JSON: {exc}", fatal=True, record=False)
        return
    if not isinstance(array, list):
        yield _Bad(
            f"input is not a JSON array but {_describe(array)}: --from json expects [{{...}}, ...]"
            " (use --from jsonl for one object per line)",
            fatal=True,
            record=False,
        )
        return
    for index, obj in enumerate(array):
        try:
            yield from_rest(obj, strict=strict)
        except RestDecodeError as exc:
            yield _Bad(f"record {index}: {exc}")


def _lines(read: Callable[[int], bytes]) -> Iterator[bytes]:
    """The lines of a stream, without their ``\\n``, read a chunk at a time."""
    buf = bytearray()
    while chunk := read(_CHUNK):
        cut = chunk.rfind(b"\n")
        if cut < 0:
            buf += chunk
            continue
        buf += chunk[:cut]
        yield from bytes(buf).split(b"\n")
        buf[:] = chunk[cut + 1 :]
    if buf:
        yield bytes(buf)


def _read_jsonl(source: _Input, strict: bool) -> Iterator[_Item]:
    """Records of one JSON object per line; blank lines are skipped."""
    index = 0
    for number, raw in enumerate(_lines(source.read), start=1):
        line = raw[len(_BOM) :] if number == 1 and raw.startswith(_BOM) else raw
        if not line.strip(_JSON_BLANK):
            continue
        where = f"(line {number})"
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield _Bad(f"record {index}: {_not_utf8(exc, 'the line')} {where}")
        except RecursionError:
            yield _Bad(f"record {index}: not usable JSON: nested too deeply {where}")
        except json.JSONDecodeError as exc:
            yield _Bad(f"record {index}: not valid JSON: {exc.msg} at column {exc.colno} {where}")
        except ValueError as exc:  # an integer with too many digits
            yield _Bad(f"record {index}: not usable JSON: {exc} {where}")
        else:
            try:
                yield from_rest(obj, strict=strict)
            except RestDecodeError as exc:
                yield _Bad(f"record {index}: {exc} {where}")
        index += 1


# Enum fields: proto field name -> (REST key, the numbers that have a REST spelling).
_ENUMS: Final = {
    field.name: (field.json_name, frozenset(rest_names(field.enum_type)))
    for field in ProtectionShellInfo.DESCRIPTOR.fields
    if field.enum_type is not None
}


def _binary_problem(msg: ProtectionShellInfo, strict: bool) -> str | None:
    """Say why a parsed binary record is not one its REST form would give, or None.

    What the schema knows, protobuf has checked. What it does not know, kept in
    ``unrecognized``, is checked by a round trip through the REST form: a
    binary record is valid exactly when the REST object it stands for is (so
    ``validate`` and ``--strict`` mean the same for every format).
    """
    if msg.HasField("unrecognized"):
        try:
            from_rest(to_rest(msg), strict=strict)
        except RecursionError:
            return "unrecognized: a kept value is nested too deeply"
        except RestDecodeError as exc:
            return str(exc)
        except ValueError as exc:  # from json.loads in to_rest
            return f"unrecognized: a kept value is not valid JSON ({exc})"
    if strict:
        for attr, (key, known) in _ENUMS.items():
            number = getattr(msg, attr)
            if number and number not in known:
                return f"{key}: unknown value {number} (strict mode)"
        unknown = UnknownFieldSet(msg)
        if len(unknown):
            numbers = sorted({unknown[i].field_number for i in range(len(unknown))})
            return f"field number {', '.join(map(str, numbers))} is not in this schema version (strict mode)"
    return None


def _read_binary(source: _Input, strict: bool) -> Iterator[_Item]:
    """Records of a length-delimited stream, read incrementally."""
    frames = iter_frames(source)
    while True:
        try:
            frame = next(frames, None)
        except FramingError as exc:  # truncated, or a bad length: the next record cannot be found
            yield _Bad(str(exc), fatal=True)
            return
        if frame is None:
            return
        try:
            msg = frame.decode()
        except FramingError as exc:  # the payload is bad, but the framing says where the next record starts
            yield _Bad(str(exc))
            continue
        problem = _binary_problem(msg, strict) if strict or msg.HasField("unrecognized") else None
        yield msg if problem is None else _Bad(f"record {frame.index}: {problem}")


_READERS: Final[dict[str, Callable[[_Input, bool], Iterator[_Item]]]] = {
    "json": _read_json,
    "jsonl": _read_jsonl,
    "binary": _read_binary,
}


# --- writing ------------------------------------------------------------------


def _dumps(msg: ProtectionShellInfo) -> bytes:
    """One record as compact REST JSON, UTF-8.

    Every record that reaches here came through ``from_rest`` or passed
    ``_binary_problem``, so its text is valid Unicode and its numbers finite.
    """
    return json.dumps(to_rest(msg), ensure_ascii=False, separators=_COMPACT).encode()


class _Writer:
    """Writes records to standard output in one of the FORMATS.

    Output is gathered here and written in pieces of about 64 KiB, or when
    :meth:`flush` is called, whatever buffering standard output has (none under
    ``python -u`` or ``PYTHONUNBUFFERED``).
    """

    def __init__(self, out: BinaryIO, form: str) -> None:
        self._out = out
        self._form = form
        self._count = 0
        self._parts: list[bytes] = []
        self._pending = 0

    def write(self, msg: ProtectionShellInfo) -> None:
        """Add one record to the output."""
        if self._form == "binary":
            data = encode_delimited(msg)
        elif self._form == "jsonl":
            data = _dumps(msg) + b"\n"
        else:  # json: "[" opens the array with the first record, one record per line
            data = (b",\n" if self._count else b"[\n") + _dumps(msg)
        self._count += 1
        self._parts.append(data)
        self._pending += len(data)
        if self._pending >= _CHUNK:
            self._drain()

    def close(self) -> None:
        """End the output and flush it. For json, close the array: partial output is valid JSON too."""
        if self._form == "json":
            self._parts.append(b"\n]\n" if self._count else b"[]\n")
        self.flush()

    def flush(self) -> None:
        """Write out everything written so far."""
        self._drain()
        self._out.flush()

    def _drain(self) -> None:
        if not self._parts:
            return
        data = b"".join(self._parts)
        self._parts.clear()
        self._pending = 0
        _write_all(self._out, data)


# --- commands -----------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace, io: Streams) -> int:
    writer = _Writer(io.stdout, args.to_format)
    bad: _Bad | None = None
    try:
        for item in _READERS[args.from_format](_Input(io.stdin, writer.flush), args.strict):
            if isinstance(item, _Bad):
                bad = item
                break
            writer.write(item)
    except KeyboardInterrupt:
        writer.close()  # keep what was accepted
        raise
    writer.close()  # what was accepted is out before the error is reported
    if bad is None:
        return EXIT_OK
    io.report(f"{_PROG} convert: {bad.message}")
    return EXIT_BAD_INPUT


def _cmd_validate(args: argparse.Namespace, io: Streams) -> int:
    total = bad = 0
    stopped = None
    for item in _READERS[args.from_format](_Input(io.stdin, _nothing), args.strict):
        if isinstance(item, _Bad):
            if not item.record:
                io.report(f"{_PROG} validate: {item.message}")
                return EXIT_BAD_INPUT
            bad += 1
            io.report(item.message)
            if item.fatal:
                stopped = total
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


def _add_convert(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert records between json, jsonl and binary",
        description="Read records from standard input and write them to standard output in another format."
        " Records are written as they are read; at the first bad record, the ones before it are written,"
        " the error is reported on standard error and the exit status is 2.",
    )
    _add_format(parser, "--from", "from_format", "standard input")
    _add_format(parser, "--to", "to_format", "standard output")
    _add_strict(parser)
    parser.set_defaults(handler=_cmd_convert)


def _add_validate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check every record and report the bad ones",
        description="Read records from standard input and report each bad one on standard error, then a summary."
        " Exit status 0 if every record is valid, 2 otherwise.",
    )
    _add_format(parser, "--from", "from_format", "standard input")
    _add_strict(parser)
    parser.set_defaults(handler=_cmd_validate)


_COMMANDS: Final = (*_SERVICE_COMMANDS, _add_convert, _add_validate)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser: one subcommand for each entry of ``_COMMANDS``.

    Each subcommand sets ``handler``, a ``(args, io: Streams) -> int`` function
    that :func:`main` calls.
    """
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Work with Cohesity ProtectionShellInfo records (shellinfo.v1): protection-run status.",
    )
    parser.add_argument("--version", action="version", version=f"{_PROG} {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in _COMMANDS:
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
        print(f"{_PROG}: {_one_line(str(exc))}", file=err)
        return EXIT_CALL_FAILED
    except ShellInfoError as exc:  # bad input, or a setting that cannot work (ConfigurationError)
        print(f"{_PROG}: {_one_line(str(exc))}", file=err)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"{_PROG}: I/O error: {exc}", file=err)
        return EXIT_IO_ERROR


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _std_buffer(stream: TextIO | None, what: str) -> BinaryIO:
    if stream is None:  # started with the descriptor closed
        raise OSError(f"standard {what} is closed")
    return stream.buffer


if __name__ == "__main__":
    sys.exit(main())
