"""Record streams: the one reader of json, jsonl and binary input, and the writer of records in a format.

``json`` is one JSON array of REST objects, as the Cohesity REST API returns
them; ``jsonl`` one REST object per line; ``binary`` length-delimited protobuf
(see :mod:`shellinfo_grpc.framing`). ``convert`` and ``validate`` read with
:data:`READERS`; ``publish`` reads its arguments and standard input (a JSON
array, one object, or JSON Lines) with the same readers, so a bad record is
reported in the same words by every command.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final, TypeVar

from google.protobuf.unknown_fields import UnknownFieldSet

from shellinfo_grpc._gen.shellinfo.v1.protection_job_pb2 import ProtectionJob
from shellinfo_grpc._gen.shellinfo.v1.protection_shell_info_pb2 import ProtectionShellInfo
from shellinfo_grpc.cli._io import COMPACT
from shellinfo_grpc.errors import (
    FramingError,
    RestDecodeError,
)
from shellinfo_grpc.framing import encode_delimited, iter_frames, write_all
from shellinfo_grpc.rest import from_rest, rest_names, to_rest
from shellinfo_grpc.run_instance import from_run_instance

__all__ = [
    "FORMATS",
    "READERS",
    "Bad",
    "Input",
    "Item",
    "Records",
    "Writer",
    "nothing",
    "read_arguments",
    "read_publish_input",
]


#: The record stream formats ``--from`` and ``--to`` accept.
FORMATS: Final = ("json", "jsonl", "binary")


_T = TypeVar("_T")
_CHUNK: Final = 64 * 1024
_BOM: Final = b"\xef\xbb\xbf"
_JSON_BLANK: Final = b" \t\r"  # what JSON counts as whitespace, besides the newline that ends a line


# --- reading ------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A record, or the whole input, that could not be read.

    ``message`` is the one line to report. ``fatal``: nothing after it can be
    read. ``record``: it stands for one record (``validate`` counts it); when
    false, the input as a whole is unreadable (not JSON at all, say).
    """

    message: str
    fatal: bool = False
    record: bool = True


#: A record read, or why it could not be.
Item = ProtectionShellInfo | Bad


class Input:
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


def nothing() -> None:
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


def _run(obj: Any, strict: bool) -> ProtectionShellInfo:
    """A REST ProtectionShellInfo object as a record."""
    return from_rest(obj, strict=strict)


def _read_json(source: Input, strict: bool, decode: Callable[[Any, bool], _T] = _run) -> Iterator[_T | Bad]:  # type: ignore[assignment]
    """Records of one JSON array (each object read by ``decode``); the whole input must be read before the first."""
    data = source.read_all()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield Bad(_not_utf8(exc, "input"), fatal=True, record=False)
        return
    try:
        array = json.loads(text)
    except RecursionError:
        yield Bad("input is not usable JSON: it is nested too deeply", fatal=True, record=False)
        return
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        yield Bad(f"input is not valid JSON: {exc}", fatal=True, record=False)
        return
    if not isinstance(array, list):
        yield Bad(
            f"input is not a JSON array but {_describe(array)}: --from json expects [{{...}}, ...]"
            " (use --from jsonl for one object per line)",
            fatal=True,
            record=False,
        )
        return
    for index, obj in enumerate(array):
        try:
            yield decode(obj, strict)
        except RestDecodeError as exc:
            yield Bad(f"record {index}: {exc}")


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


def _record(
    raw: bytes,
    index: int,
    strict: bool,
    where: str = "",
    decode: Callable[[Any, bool], _T] = _run,  # type: ignore[assignment]
) -> _T | Bad:
    """Record ``index`` from the JSON text ``raw``: the message, or what is wrong with it.

    ``where`` (`` (line N)``) ends every message, to say where the record stood.
    """
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return Bad(f"record {index}: {_not_utf8(exc, 'the line')}{where}")
    except RecursionError:
        return Bad(f"record {index}: not usable JSON: nested too deeply{where}")
    except json.JSONDecodeError as exc:
        return Bad(f"record {index}: not valid JSON: {exc.msg} at column {exc.colno}{where}")
    except ValueError as exc:  # an integer with too many digits
        return Bad(f"record {index}: not usable JSON: {exc}{where}")
    try:
        return decode(obj, strict)
    except RestDecodeError as exc:
        return Bad(f"record {index}: {exc}{where}")


def _read_jsonl(source: Input, strict: bool, decode: Callable[[Any, bool], _T] = _run) -> Iterator[_T | Bad]:  # type: ignore[assignment]
    """Records of one JSON object per line; blank lines are skipped."""
    index = 0
    for number, raw in enumerate(_lines(source.read), start=1):
        line = raw[len(_BOM) :] if number == 1 and raw.startswith(_BOM) else raw
        if not line.strip(_JSON_BLANK):
            continue
        yield _record(line, index, strict, f" (line {number})", decode)
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


def _read_binary(source: Input, strict: bool) -> Iterator[Item]:
    """Records of a length-delimited stream, read incrementally."""
    frames = iter_frames(source)
    while True:
        try:
            frame = next(frames, None)
        except FramingError as exc:  # truncated, or a bad length: the next record cannot be found
            yield Bad(str(exc), fatal=True)
            return
        if frame is None:
            return
        try:
            msg = frame.decode()
        except FramingError as exc:  # the payload is bad, but the framing says where the next record starts
            yield Bad(str(exc))
            continue
        problem = _binary_problem(msg, strict) if strict or msg.HasField("unrecognized") else None
        yield msg if problem is None else Bad(f"record {frame.index}: {problem}")


READERS: Final[dict[str, Callable[[Input, bool], Iterator[Item]]]] = {
    "json": _read_json,
    "jsonl": _read_jsonl,
    "binary": _read_binary,
}


# --- reading what publish is given -----------------------------------------------


@dataclass
class Records:
    """Records read for publishing, or the lines that say why some could not be.

    ``jobs[i]`` is the job of ``runs[i]``: given when the record was a
    ``ProtectionRunInstance`` (``jobId``, ``jobName``, ``jobUid``), else ``None``.
    """

    runs: list[ProtectionShellInfo]
    problems: list[str]  # one line per bad record
    unreadable: str | None = None  # the input as a whole cannot be read
    jobs: list[ProtectionJob | None] = field(default_factory=list)


_Published = tuple[ProtectionShellInfo, ProtectionJob | None]


def _published(obj: Any, strict: bool) -> _Published:
    """A record to publish: a ``ProtectionRunInstance`` (its run and job) or a bare ProtectionShellInfo."""
    if isinstance(obj, dict) and "protectionShellInfo" in obj:
        return from_run_instance(obj, strict=strict)
    return from_rest(obj, strict=strict), None


def _collect(items: Iterable[_Published | Bad]) -> Records:
    """Sort records read into the runs (and jobs) and the problems; an unreadable input ends it."""
    records = Records([], [])
    for item in items:
        if isinstance(item, tuple):
            records.runs.append(item[0])
            records.jobs.append(item[1])
        elif item.record:
            records.problems.append(item.message)
        else:
            return Records([], [], item.message)
    return records


def read_arguments(texts: Sequence[str], strict: bool) -> Records:
    """Records given as arguments, one JSON object each."""
    return _collect(
        _record(text.encode("utf-8", "surrogateescape"), index, strict, decode=_published)
        for index, text in enumerate(texts)
    )


def read_publish_input(data: bytes, strict: bool) -> Records:
    """Records from standard input: a JSON array, one JSON object, or JSON Lines."""
    body = data.removeprefix(_BOM).strip(_JSON_BLANK + b"\n")
    if not body:
        return Records([], [])
    source = Input(io.BytesIO(data), nothing)
    if body.startswith(b"["):
        return _collect(_read_json(source, strict, _published))
    try:
        json.loads(body)
    except RecursionError:
        return Records([], [], "input is not usable JSON: it is nested too deeply")
    except ValueError:  # not one JSON value: JSON Lines, or bad input that the line-by-line reading pinpoints
        return _collect(_read_jsonl(source, strict, _published))
    return _collect([_record(body, 0, strict, decode=_published)])


# --- writing ------------------------------------------------------------------


def _dumps(msg: ProtectionShellInfo) -> bytes:
    """One record as compact REST JSON, UTF-8.

    Every record that reaches here came through ``from_rest`` or passed
    ``_binary_problem``, so its text is valid Unicode and its numbers finite.
    """
    return json.dumps(to_rest(msg), ensure_ascii=False, separators=COMPACT).encode()


class Writer:
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
        write_all(self._out, data)
