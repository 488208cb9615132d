"""Length-delimited binary streams of ``ProtectionShellInfo`` records.

Protobuf messages are not self-delimiting, so a file, pipe or socket that
carries several of them needs framing. This module uses the de facto standard
one: each record is its serialized bytes preceded by their length as a
base-128 varint. The bytes are identical to what Java's
``MessageLite.writeDelimitedTo`` writes and ``Parser.parseDelimitedFrom``
reads (and to C++'s ``SerializeDelimitedToOstream``), so streams written here
are read there and the other way round.

Reading is strict: a stream may end only at a record boundary. A stream that
ends inside a length prefix or a record, a length prefix longer than the ten
bytes a varint may have, a length above ``max_record_size``, or a record that
protobuf cannot parse raises :class:`~shellinfo_grpc.errors.FramingError`
naming the zero-based index of the record at fault and the byte offset where
it starts; every record before it has already been delivered.

This module imports neither grpc nor protobuf internals: the varint code is
its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, Protocol, TypeAlias

from google.protobuf.message import DecodeError

from shellinfo_grpc._gen.shellinfo.v1.protection_shell_info_pb2 import ProtectionShellInfo
from shellinfo_grpc.errors import FramingError

__all__ = [
    "DEFAULT_MAX_RECORD_SIZE",
    "Frame",
    "Readable",
    "Source",
    "encode_delimited",
    "encode_varint",
    "iter_delimited",
    "iter_frames",
    "read_delimited",
    "write_all",
    "write_delimited",
]

#: The default limit on the length of one record, 64 MiB. A record of this
#: schema is well under a kilobyte; the limit exists so that a corrupt length
#: prefix cannot make a reader allocate gigabytes.
DEFAULT_MAX_RECORD_SIZE: Final = 64 * 1024 * 1024

# A varint holds 7 bits per byte; ten bytes cover 64 bits, the most protobuf
# (and Java's readRawVarint32) accepts before calling a varint malformed.
_MAX_VARINT_BYTES: Final = 10
# How much a stream reader asks for at a time.
_CHUNK: Final = 64 * 1024
# A large record is read in steps of at most this much.
_STEP: Final = 1024 * 1024
# How much write_delimited gathers before one write to the stream.
_WRITE_BATCH: Final = 64 * 1024

# The one-byte prefixes, 0 to 127: by far the most common case.
_ONE_BYTE: Final = tuple(bytes((n,)) for n in range(0x80))


class Readable(Protocol):
    """What :func:`iter_delimited` needs of a stream: ``read(size) -> bytes``.

    Any binary file object qualifies (``open(path, "rb")``,
    ``sys.stdin.buffer``, ``io.BytesIO``, a socket's ``makefile("rb")``). If the
    stream also has ``read1`` (buffered streams do), it is used, so that records
    are delivered as soon as they arrive instead of once a whole chunk has.
    """

    def read(self, size: int = -1, /) -> bytes:
        """Read up to ``size`` bytes; ``b""`` at end of stream."""
        ...


#: What the readers accept: the whole stream as bytes, or a binary stream.
Source: TypeAlias = bytes | bytearray | memoryview | Readable


@dataclass(frozen=True, slots=True)
class Frame:
    """One record of a delimited stream, framed but not yet parsed.

    ``index`` is the zero-based position of the record in the stream, ``offset``
    the byte offset of its length prefix (counted from where reading began),
    ``payload`` its serialized bytes.
    """

    index: int
    offset: int
    payload: bytes

    def decode(self) -> ProtectionShellInfo:
        """Parse the payload; raise :class:`FramingError` if protobuf cannot."""
        try:
            return ProtectionShellInfo.FromString(self.payload)
        except DecodeError as exc:
            raise FramingError(self.index, self.offset, _unparsable(len(self.payload), exc)) from None


def encode_varint(n: int) -> bytes:
    """Encode a non-negative integer as a base-128 varint, low group first."""
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_delimited(msg: ProtectionShellInfo) -> bytes:
    """Return one record framed for a delimited stream: varint length, then bytes.

    Byte for byte what Java's ``msg.writeDelimitedTo(out)`` writes; the
    concatenation of such records is a stream :func:`iter_delimited` reads.
    """
    body = msg.SerializeToString()
    n = len(body)
    return (_ONE_BYTE[n] if n < 0x80 else encode_varint(n)) + body


def write_delimited(stream: BinaryIO, messages: Iterable[ProtectionShellInfo]) -> int:
    """Write ``messages`` to a binary ``stream`` as a delimited stream; return how many.

    Records are gathered into writes of about 64 KiB rather than written one by
    one, which is several times faster on unbuffered streams and sockets. If
    ``messages`` raises part way (a generator that converts records and meets a
    bad one, say), every record taken from it before is written before the
    error propagates: nothing already accepted is lost. The stream is not
    flushed or closed; that is the caller's to decide.
    """
    parts: list[bytes] = []
    pending = 0
    count = 0
    one_byte = _ONE_BYTE
    try:
        for msg in messages:
            body = msg.SerializeToString()
            n = len(body)
            parts.append(one_byte[n] if n < 0x80 else encode_varint(n))
            parts.append(body)
            count += 1
            pending += n
            if pending >= _WRITE_BATCH:
                data = b"".join(parts)
                parts.clear()
                pending = 0
                write_all(stream, data)
    finally:
        if parts:
            data = b"".join(parts)
            parts.clear()
            write_all(stream, data)
    return count


def write_all(stream: BinaryIO, data: bytes) -> None:
    """Write all of ``data``: an unbuffered (raw) stream may take only part of it per call."""
    written = stream.write(data)
    if written is not None and written < len(data):
        view = memoryview(data)[written:]
        while view:
            view = view[stream.write(view) or 0 :]


def _unparsable(size: int, exc: DecodeError) -> str:
    detail = str(exc).rpartition(": ")[2] or "wire format was corrupt"
    return f"its {size}-byte payload is not a valid ProtectionShellInfo ({detail})"


def _read(source: Source, max_record_size: int, *, frames: bool) -> Iterator[Any]:
    """Yield each record of ``source``: parsed, or as a :class:`Frame` if ``frames``.

    The one framing loop behind every reader. Records that lie entirely in the
    bytes at hand are sliced out and parsed with no Python work per byte and no
    call besides ``FromString``; only when a record straddles the end of what
    has been read is the stream read again.
    """
    parse = ProtectionShellInfo.FromString
    read: Callable[[int], object] | None
    if isinstance(source, bytes):
        buf, read = source, None
    elif isinstance(source, (bytearray, memoryview)):
        buf, read = bytes(source), None  # a snapshot: later changes to source cannot tear a record
    else:
        buf, read = b"", getattr(source, "read1", source.read)
    base = 0  # stream offset of buf[0]
    pos = 0  # where the next record starts in buf
    index = 0
    while True:
        end = len(buf)
        need = 0  # how many bytes past `end` the record at `pos` still lacks, when known
        while pos < end:
            n = buf[pos]
            p = pos + 1
            if n >= 0x80:
                n, p = _decode_length(buf, p, end, n)
                if n < 0:
                    if p - pos >= _MAX_VARINT_BYTES:
                        raise FramingError(index, base + pos, f"length prefix is longer than {_MAX_VARINT_BYTES} bytes")
                    break  # the prefix goes on past `end`
            if n > max_record_size:
                raise FramingError(index, base + pos, f"record length {n} exceeds the limit of {max_record_size} bytes")
            q = p + n
            if q > end:
                need = q - end
                break
            if frames:
                yield Frame(index, base + pos, buf[p:q])
            else:
                try:
                    msg = parse(buf[p:q])
                except DecodeError as exc:
                    raise FramingError(index, base + pos, _unparsable(n, exc)) from None
                yield msg
            pos = q
            index += 1
        # There is no complete record at `pos`: read more, or end.
        if read is not None:
            chunk = _read_more(read, need)
            if chunk:
                base += pos
                buf = buf[pos:] + chunk
                pos = 0
                continue
        if pos == end:
            return
        raise FramingError(index, base + pos, _truncation(buf, pos, end))


def _decode_length(buf: bytes, p: int, end: int, first: int) -> tuple[int, int]:
    """Decode the rest of a varint whose first byte, ``first``, was at ``p - 1``.

    Return ``(value, position after it)``, or ``(-1, position reached)`` when
    the varint does not end within ``buf[:end]`` or within ten bytes.
    """
    n = first & 0x7F
    shift = 7
    stop = min(end, p - 1 + _MAX_VARINT_BYTES)
    while p < stop:
        b = buf[p]
        p += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, p
        shift += 7
    return -1, p


def _checked(chunk: object) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    if chunk is None:  # a non-blocking stream with nothing ready
        raise BlockingIOError("iter_delimited needs a blocking stream")
    raise TypeError(f"iter_delimited needs a binary stream, but read() returned {type(chunk).__name__}")


def _read_more(read: Callable[[int], object], need: int) -> bytes:
    """Read the next bytes of a stream: what is at hand, and at least ``need`` unless it ends.

    ``b""`` means the stream has ended. A large ``need`` is read a step at a
    time, so that memory grows only with bytes that actually arrive, not with
    what a (possibly corrupt) length prefix claims.
    """
    chunk = _checked(read(max(_CHUNK, min(need, _STEP))))
    if len(chunk) >= need or not chunk:
        return chunk
    parts = [chunk]
    got = len(chunk)
    while got < need:
        more = _checked(read(min(need - got, _STEP)))
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _truncation(buf: bytes, pos: int, end: int) -> str:
    """Say how a stream that ends inside the record starting at ``pos`` ends."""
    n, p = _decode_length(buf, pos + 1, end, buf[pos]) if buf[pos] >= 0x80 else (buf[pos], pos + 1)
    if n < 0:
        return f"stream ends inside the length prefix of the record ({end - pos} of its bytes are there)"
    return f"stream ends inside the record: its length is {n} bytes but only {end - p} follow"


def _check(source: object, max_record_size: int) -> None:
    if isinstance(max_record_size, bool) or not isinstance(max_record_size, int) or max_record_size < 0:
        raise ValueError(f"max_record_size must be a non-negative integer, got {max_record_size!r}")
    if isinstance(source, str) or not (isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read")):
        raise TypeError(f"expected bytes or a binary stream, got {type(source).__name__}")


def iter_frames(source: Source, *, max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> Iterator[Frame]:
    """Yield each record of a delimited stream as a :class:`Frame`, without parsing it.

    For tools that pass records through untouched, or that want to go on past a
    record protobuf cannot parse (:meth:`Frame.decode` raises for that record
    alone, and the framing says where the next one starts). Framing errors
    (truncation, a bad or oversized length) raise :class:`FramingError` as in
    :func:`iter_delimited`: after one, the stream cannot be resynchronized.
    """
    _check(source, max_record_size)
    return _read(source, max_record_size, frames=True)


def iter_delimited(source: Source, *, max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> Iterator[ProtectionShellInfo]:
    """Yield the records of a delimited stream, one by one, as they are read.

    ``source`` is the whole stream as bytes, or a binary file object that is
    read incrementally (never all at once), so streams larger than memory and
    live pipes work: each record is yielded as soon as its last byte is read.

    Raises :class:`FramingError` (after yielding every record before the bad
    one) when the stream ends inside a length prefix or a record, when a length
    prefix is longer than 10 bytes or above ``max_record_size`` (checked before
    anything is allocated for the record), or when a record is not a valid
    ``ProtectionShellInfo``. A stream that ends exactly at a record boundary,
    including an empty one, ends the iteration normally. ``ValueError`` or
    ``TypeError`` for a bad argument are raised at once, not on first use.
    """
    _check(source, max_record_size)
    return _read(source, max_record_size, frames=False)


def read_delimited(source: Source, *, max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> list[ProtectionShellInfo]:
    """Read a whole delimited stream into a list; see :func:`iter_delimited`."""
    return list(iter_delimited(source, max_record_size=max_record_size))
