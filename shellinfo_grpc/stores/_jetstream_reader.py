"""A lean reader of a JetStream stream's history, for :class:`~shellinfo_grpc.stores.nats.NatsStore`'s catch-up.

nats-py hands every message to a coroutine as a ``Msg`` object with its
headers parsed, which costs the service more CPU per stored update than the
rest of a catch-up together. This reader sits below that: it speaks the NATS
client protocol itself on one connection of its own (per store, opened on
first use to the server nats-py is connected to, opened again after a
failure), and parses the ``HMSG`` frames of pull-consumer deliveries in bulk
from one buffer: the stream sequence from the ``$JS.ACK`` reply subject (the
9-token form and the 12-token form with domain and account hash), the header
block skipped by its length, the payload copied once with the ``revision``
field appended (the wire form of the store's catch-up), a missing sequence
noted. A message stored without headers comes as ``MSG``. A status message
(``404 No Messages``, or ``408 Request Timeout`` from older servers; ``409
...``) ends a pull. What a read hands out is checked to be RunUpdates in one
parse (a :class:`Chunk` says which were not).

A **cursor** is one pull consumer reading forward from a position. A
catch-up reads the history in consecutive calls, so a cursor is kept, keyed
by the position its next call starts from (at most :data:`KEPT` of them, each
unread for at most :data:`IDLE` seconds; the consumers of dropped ones are
deleted, and have an inactivity threshold in case the delete is lost). A cursor asks for the next pull as soon as the
previous one has arrived, while its caller is still sending what it got: up
to two pulls of at most :data:`PULL_MESSAGES` messages or :data:`PULL_BYTES`
bytes each are held.

What the reader cannot do correctly it does not try: it raises
:class:`ReaderUnavailable` and the store reads through nats-py instead. That
covers authentication other than none, a user and password or a token from
the server URL (creds files, nkeys, JWTs are the store's to refuse before
the reader is made), a server whose first line is not INFO or that refuses
the connection, a TLS setting the server does not match, and any frame it
does not expect. A read that fails half way returns nothing: its caller
reads the whole range again through nats-py.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import re
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Final, NamedTuple, TypeAlias
from urllib.parse import ParseResult

from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc

__all__ = [
    "IDLE",
    "KEPT",
    "PULL_BYTES",
    "PULL_MESSAGES",
    "SCAN_PULL",
    "Chunk",
    "Endpoint",
    "JetStreamReader",
    "ReaderUnavailable",
    "Scanned",
    "checked",
    "revision_field",
    "with_revision",
]

_log = logging.getLogger("shellinfo_grpc.nats_store")

#: Most messages, and bytes (as JetStream counts them), one pull asks for.
PULL_MESSAGES: Final = 16_384
PULL_BYTES: Final = 8 << 20
#: Messages one pull of a scan asks for (headers only: about 200 bytes each on the wire).
SCAN_PULL: Final = 32_768
#: Cursors kept between calls (the oldest is dropped).
KEPT: Final = 8
#: Seconds a kept cursor may go unread before it is dropped: an abandoned catch-up's read-ahead
#: is not served to a later call (well under its consumer's inactivity threshold of 30 s or more).
IDLE: Final = 5.0
#: How long the reader is not tried again after the server refused it (seconds).
_REFUSED_PAUSE: Final = 60.0

# One delivered message or status: HMSG <subject> <sid> [<reply>] <header bytes> <total bytes>.
# A consumer's delivery has the reply $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.
# <consumer seq>.<time>.<pending> (7 tokens after $JS.ACK: the stream sequence is group 3) or
# $JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.
# <time>.<pending>[.<token>...] (9 or more: group 4); neither can be taken for the other. A status
# has no reply (groups 3 and 4 empty) and its subject (group 1) is the reply subject of the pull
# it ends. A reply of any other form does not match.
# A message stored without headers comes as MSG <subject> <sid> [<reply>] <total bytes> (group 5
# empty); a status is always an HMSG.
_FRAME: Final = re.compile(
    rb"(H?)MSG ([^ \r\n]+) (\d+) (?:\$JS\.ACK\.(?:"
    rb"[^. ]+\.[^. ]+\.\d+\.(\d+)\.\d+\.\d+\.\d+"
    rb"|[^. ]+\.[^. ]+\.[^. ]+\.[^. ]+\.\d+\.(\d+)\.\d+\.\d+\.\d+(?:\.[^ \r\n]+)?"
    rb") )?(?:(\d+) )?(\d+)\r\n"
)
# A scan's frame: as _FRAME, with the whole $JS.ACK tail (group 4) split by the scan.
_SCAN_FRAME: Final = re.compile(rb"(H?)MSG ([^ \r\n]+) (\d+) (?:\$JS\.ACK\.([^ \r\n]+) )?(?:(\d+) )?(\d+)\r\n")
_CRLF: Final = b"\r\n"
_FRAME_STARTS: Final = frozenset(b"HM")
_first = itemgetter(0)


def _delivery(stream: str) -> re.Pattern[bytes]:
    """The common frame, fast: an HMSG of ``stream``'s consumer, 7-token reply (groups: sid, sequence, sizes).

    Exactly 7 tokens after ``$JS.ACK.<stream>``'s prefix, then a space: it
    cannot match the 12-token form. Everything else goes through ``_FRAME``.
    """
    return re.compile(
        rb"HMSG [^ \r\n]+ (\d+) \$JS\.ACK\."
        + re.escape(stream.encode())
        + rb"\.[^. ]+\.\d+\.(\d+)\.\d+\.\d+\.\d+ (\d+) (\d+)\r\n"
    )


#: RunUpdate.revision is field 3, a varint: appended to a stored message, it sets the revision.
_REVISION_TAG: Final = 3 << 3


def revision_field(seq: int) -> bytes:
    """``revision = seq`` as a field to append to a stored RunUpdate (a sequence is positive)."""
    out = bytearray((_REVISION_TAG,))
    value = seq & ((1 << 64) - 1)
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def with_revision(payload: bytes, seq: int) -> bytes:
    """``payload + revision_field(seq)``, without a loop for 2**14 <= seq < 2**28 (the parser has it inline)."""
    if 1 << 14 <= seq < 1 << 21:
        field = 0x808018 | (seq & 0x7F) << 8 | (seq >> 7 & 0x7F) << 16 | (seq >> 14) << 24
        return payload + field.to_bytes(4, "little")
    if 1 << 21 <= seq < 1 << 28:
        return payload + (
            0x80808018 | (seq & 0x7F) << 8 | (seq >> 7 & 0x7F) << 16 | (seq >> 14 & 0x7F) << 24 | (seq >> 21) << 32
        ).to_bytes(5, "little")
    return payload + revision_field(seq)


_LENGTHS: Final = [bytes((n,)) for n in range(0x80)] + [bytes((n & 0x7F | 0x80, n >> 7)) for n in range(0x80, 1 << 14)]
_UPDATES_TAG: Final = b"\n"  # WatchRunsResponse.updates: field 1, length-delimited


def checked(records: list[tuple[int, bytes]]) -> tuple[list[tuple[int, bytes]], list[int]]:
    """The records that are RunUpdates, and the sequences of those that are not.

    One parse of them all as the ``updates`` of a WatchRunsResponse (upb
    checks each embedded message as it would check it alone); only when that
    fails is each parsed on its own.
    """
    parts: list[bytes] = []
    lengths = _LENGTHS
    for _, data in records:
        size = len(data)
        parts += (_UPDATES_TAG, lengths[size] if size < 1 << 14 else _length(size), data)
    try:
        _svc.WatchRunsResponse.FromString(b"".join(parts))
    except Exception:  # a foreign message among them: find it below
        _log.debug("a read of %d messages has one that is not a RunUpdate", len(records))
    else:
        return records, []
    parse = _svc.RunUpdate.FromString
    good: list[tuple[int, bytes]] = []
    foreign: list[int] = []
    for record in records:
        try:
            parse(record[1])
        except Exception:  # any parse error means "not a RunUpdate"
            foreign.append(record[0])
        else:
            good.append(record)
    return good, foreign


def _length(size: int) -> bytes:
    out = bytearray()
    while size >= 0x80:
        out.append((size & 0x7F) | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out)


def header_value(block: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` in a message's header block, as nats-py reads it (stripped, the last wins)."""
    if name not in block:
        return None
    found = None
    for line in block.split(_CRLF)[1:]:  # the first line is NATS/1.0
        key, sep, value = line.partition(b":")
        if sep and key.strip() == name:
            found = value.strip()
    return found


class Chunk(NamedTuple):
    """What one read hands out."""

    #: ``(stream sequence, payload with the revision field appended)`` of the RunUpdates, in order.
    records: list[tuple[int, bytes]]
    #: The first sequence of each stretch of missing sequences before the newest message handed out.
    gaps: list[int]
    #: The sequences of messages that are not RunUpdates (left out of ``records``).
    foreign: list[int]
    #: Where the next read starts: after the newest message handed out (``start`` if none was), or
    #: after ``end`` when the consumer delivered a newer message (those up to ``end`` were deleted).
    next: int


class ReaderUnavailable(Exception):
    """This read cannot go through the reader: read through nats-py instead.

    ``lasting``: no later read will work either (a protocol surprise);
    ``pause``: seconds before the reader is tried again (the server refused it).
    """

    def __init__(self, reason: str, *, lasting: bool = False, pause: float = 0.0) -> None:
        super().__init__(reason)
        self.lasting = lasting
        self.pause = pause


@dataclass(frozen=True)
class Endpoint:
    """Where the reader connects, and how it authenticates, as nats-py does for the same URL."""

    host: str
    port: int
    user: str | None
    password: str | None
    tls: ssl.SSLContext | None
    tls_scheme: bool

    @classmethod
    def of(cls, url: ParseResult, tls: ssl.SSLContext | None) -> Endpoint:
        if url.scheme not in ("nats", "tls") or not url.hostname:
            raise ReaderUnavailable(f"server URL scheme {url.scheme!r} is not supported", lasting=True)
        return cls(url.hostname, url.port or 4222, url.username, url.password, tls, url.scheme == "tls")

    def connect_command(self, info: dict[str, Any]) -> bytes:
        options: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "name": "shellinfo-grpc history reader",
            "lang": "python3",
            "version": "shellinfo-grpc",
            "protocol": 1,
            "headers": True,
            "no_responders": True,
            "echo": False,
        }
        if info.get("auth_required") and self.user is not None:
            if self.password is None:
                options["auth_token"] = self.user
            else:
                options["user"], options["pass"] = self.user, self.password
        return b"CONNECT " + json.dumps(options).encode() + b"\r\nPING\r\n"


class _Cursor:
    """One pull consumer reading the history forward: what it has received and not yet handed out."""

    def __init__(self, wire: _Wire, consumer: str, sid: int, start: int, end: int) -> None:
        self.wire = wire
        self.consumer = consumer
        self.sid = sid
        self.next = start  # where the next read starts: the key it is kept under
        self.end = end  # the last sequence worth reading, as the latest read said
        # (stream sequence, payload with the revision field); the parser appends
        self.received: list[tuple[int, bytes]] = []
        self.taken = 0  # index in `received` of the first one not handed out
        self.last = start - 1  # the newest sequence received; the parser keeps it
        self.gaps: list[int] = []  # the first sequence of each stretch the consumer skipped; the parser appends
        self.target = 0  # len(received) at which the pull in flight is complete (0: none in flight)
        self.pulled_from = 0  # len(received) when the pull in flight was asked for
        self.pulls = 0  # pulls asked for: the reply subject of the n-th ends in .<n>
        self.exhausted = False  # the last pull ended with "no messages": ask again only when read again
        self.error: ReaderUnavailable | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.news = 0  # messages or statuses seen: progress, for the timeout
        self.used = time.monotonic()  # when it was last read: a cursor idle for IDLE seconds is dropped

    def wake(self) -> None:
        self.news += 1
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def arrived(self) -> None:
        """The parser appended messages: a pull may be complete, and a reader waiting."""
        if self.target and len(self.received) >= self.target:
            self.target = 0
        self.pump()
        self.wake()

    def status(self, subject: bytes, line: bytes) -> None:
        """A status message: the end of the pull in flight, or news of one already complete."""
        if not subject.endswith(b".%d" % self.pulls):
            return  # "409 Batch Completed" of a pull whose messages all came: the next one is out
        if self.target and len(self.received) >= self.target:
            self.target = 0  # complete by count: the messages came in the same read as this
        code = line[9:12]
        if not self.target:
            if code != b"409" or b"Batch Completed" not in line:
                self.fail(ReaderUnavailable(f"status {line.decode(errors='replace')!r} after its pull"))
        elif code in (b"404", b"408") or (
            code == b"409" and b"MaxBytes" in line and len(self.received) > self.pulled_from
        ):
            # No (more) messages right now (408 from older servers); or the next one would exceed max_bytes.
            self.target = 0
            self.exhausted = code != b"409"
            self.pump()
        else:  # 409 consumer deleted, leadership change, a message larger than a pull, ...
            self.fail(ReaderUnavailable(f"pull ended with {line.decode(errors='replace')!r}"))
        self.wake()

    def fail(self, error: ReaderUnavailable) -> None:
        if self.error is None:
            self.error = error
        self.target = 0
        self.wake()

    def pump(self) -> None:
        """Ask for the next pull, unless one is in flight, two are held, or the end has been reached."""
        if self.target or self.exhausted or self.error is not None or self.last >= self.end:
            return
        if len(self.received) - self.taken >= PULL_MESSAGES or not self.wire.open:
            return
        if self.taken > 4096 and 2 * self.taken > len(self.received):
            del self.received[: self.taken]
            self.taken = 0
        batch = min(PULL_MESSAGES, self.end - self.last)
        self.pulled_from = len(self.received)
        self.target = self.pulled_from + batch
        self.pulls += 1
        self.wire.pull(self, batch)

    async def read(self, end: int, limit: int, timeout: float) -> Chunk:
        """Up to ``limit`` messages from ``next`` up to ``end``; fewer when the consumer had no more."""
        self.end = max(self.end, end)
        self.exhausted = False
        out: list[tuple[int, bytes]] = []
        while True:
            if self.error is not None:
                raise self.error
            received, i = self.received, self.taken
            j = min(len(received), i + limit - len(out))
            if j > i and received[j - 1][0] > end:
                j = bisect.bisect_right(received, end, lo=i, hi=j, key=_first)
            out += received[i:j]
            self.taken = j
            if len(out) >= limit or self.last >= end or (self.exhausted and not self.target):
                break
            self.pump()
            self.waiter = asyncio.get_running_loop().create_future()
            before = self.news
            try:
                await asyncio.wait_for(self.waiter, timeout)
            except TimeoutError:
                if self.news == before and self.error is None:
                    self.wire.abort(f"no message within {timeout:g} s")
            finally:
                self.waiter = None
        gaps: list[int] = []
        if out:
            self.next = out[-1][0] + 1
        if self.last > end and len(out) < limit and self.next <= end:
            # The consumer went past `end` (the messages up to it were deleted): the range is done.
            # What it skipped up to `end` is a gap, checked by the caller (deleted, or trimmed).
            self.next = end + 1
        if self.gaps and self.gaps[0] < self.next:
            cut = bisect.bisect_left(self.gaps, self.next)
            gaps, self.gaps = self.gaps[:cut], self.gaps[cut:]
        self.pump()  # read ahead while the caller sends these
        self.used = time.monotonic()
        records, foreign = checked(out)
        return Chunk(records, gaps, foreign, self.next)


class _Wire(asyncio.Protocol):
    """The reader's connection: the handshake, then every frame parsed as it arrives."""

    def __init__(self, endpoint: Endpoint, stream: str) -> None:
        self.endpoint = endpoint
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.open = False  # handshake done, not lost
        self.error: ReaderUnavailable | None = None
        self.cursors: dict[int, _Cursor] = {}  # by subscription id
        self.prefix = f"_INBOX.{secrets.token_hex(11)}"
        self._delivery = _delivery(stream).match
        self._next_sid = 0
        self._buffer = bytearray()  # during the handshake
        self._rest = b""  # after it: the start of a frame that has not fully arrived
        self._lines: list[bytes] = []  # control lines during the handshake
        self._handshake: asyncio.Future[None] | None = None

    # --- the handshake ----------------------------------------------------------------

    async def connect(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: self, endpoint.host, endpoint.port)
            first = await self._line()
            if not first.startswith(b"INFO "):
                raise ReaderUnavailable(f"the server's first line is not INFO: {first[:40]!r}", lasting=True)
            try:
                info = json.loads(first[5:])
                assert isinstance(info, dict)
            except (ValueError, AssertionError):
                raise ReaderUnavailable("the server's INFO is not a JSON object", lasting=True) from None
            if not info.get("headers"):
                raise ReaderUnavailable("the server does not support headers", lasting=True)
            if info.get("tls_required"):
                context = endpoint.tls or ssl.create_default_context()
                upgraded = await loop.start_tls(transport, self, context, server_hostname=endpoint.host)
                if upgraded is None:
                    raise ReaderUnavailable("TLS could not be started")
                self.transport = upgraded
            elif endpoint.tls is not None or endpoint.tls_scheme:
                raise ReaderUnavailable("TLS is configured but the server does not require it", lasting=True)
            if "nonce" in info and endpoint.user is None:
                raise ReaderUnavailable("the server sends a nonce to sign", lasting=True)
            self._write(endpoint.connect_command(info))
            while True:
                line = await self._line()
                if line == b"PONG":
                    break
                if line.startswith(b"-ERR"):
                    refused = line.decode(errors="replace")
                    raise ReaderUnavailable(f"the server refused: {refused}", pause=_REFUSED_PAUSE)
                if line == b"PING":
                    self._write(b"PONG\r\n")
                elif not line.startswith((b"INFO ", b"+OK")):
                    raise ReaderUnavailable(f"unexpected {line[:40]!r} during the handshake", lasting=True)
        self._handshake = None
        self.open = True
        if self._buffer:  # frames that came right behind the PONG
            rest = bytes(self._buffer)
            self._buffer.clear()
            self.data_received(rest)

    async def _line(self) -> bytes:
        while not self._lines:
            if self.error is not None:
                raise self.error
            self._handshake = asyncio.get_running_loop().create_future()
            await self._handshake
        return self._lines.pop(0)

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(ReaderUnavailable(f"connection lost: {exc}" if exc else "connection closed"))

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self._buffer += data
            self._handshake_lines()
            return
        # Immutable bytes, so that a payload is one slice (one copy, the revision field added
        # in the same concatenation); only an incomplete frame at the end is copied again, in
        # front of the next read. The common frame goes through one short pattern, and the
        # cursor is looked up only when the subscription id changes.
        buffer = self._rest + data if self._rest else data
        pos = 0
        size = len(buffer)
        cursors = self.cursors
        touched: list[_Cursor] = []
        delivery = self._delivery
        starts = _FRAME_STARTS
        sid_seen = b""
        cursor: _Cursor | None = None
        append: Callable[[tuple[int, bytes]], None] | None = None
        expected = 0  # the cursor's last + 1 while it is the current one
        try:
            while pos < size:
                frame = delivery(buffer, pos)
                if frame is not None:
                    sid, seq, headers, total = frame.groups()
                    body = frame.end()
                    stop = body + int(total)
                    if stop + 2 > size:
                        break  # the payload is not complete
                    if sid != sid_seen:
                        if cursor is not None:
                            cursor.last = expected - 1
                        sid_seen = sid
                        cursor = cursors.get(int(sid))
                        if cursor is None:
                            append = None
                        else:
                            append = cursor.received.append
                            expected = cursor.last + 1
                            if cursor not in touched:
                                touched.append(cursor)
                    if append is not None:
                        n = int(seq)
                        if n != expected:
                            assert cursor is not None
                            cursor.gaps.append(expected)
                        expected = n + 1
                        if 1 << 14 <= n < 1 << 21:  # revision_field(n), inline
                            field = 0x808018 | (n & 0x7F) << 8 | (n >> 7 & 0x7F) << 16 | (n >> 14) << 24
                            append((n, buffer[body + int(headers) : stop] + field.to_bytes(4, "little")))
                        else:
                            append((n, with_revision(buffer[body + int(headers) : stop], n)))
                    pos = stop + 2
                    continue
                if cursor is not None:  # anything else: the general path, from the cursors' state
                    cursor.last = expected - 1
                    cursor, append, sid_seen = None, None, b""
                if buffer[pos] in starts:
                    after = self._frame(buffer, pos, size, touched)
                    if after < 0:
                        break  # not complete
                    pos = after
                else:
                    eol = buffer.find(_CRLF, pos)
                    if eol < 0:
                        break
                    self._control(buffer[pos:eol])
                    pos = eol + 2
        except ReaderUnavailable as exc:
            self._rest = b""
            self._lost(exc)
            return
        finally:
            if cursor is not None:
                cursor.last = expected - 1
            for one in touched:
                one.arrived()
        self._rest = buffer[pos:]

    def _frame(self, buffer: bytes, pos: int, size: int, touched: list[_Cursor]) -> int:
        """Any other MSG or HMSG frame at ``pos``: where the next frame starts, or -1 if this one is incomplete."""
        frame = _FRAME.match(buffer, pos)
        if frame is None:
            if buffer.find(_CRLF, pos) < 0:
                return -1  # the frame's first line is not complete
            raise ReaderUnavailable(f"unexpected frame {buffer[pos : pos + 60]!r}", lasting=True)
        h, subject, sid, seq, seq2, headers, total = frame.groups()
        if bool(h) != (headers is not None):
            raise ReaderUnavailable(f"unexpected frame {buffer[pos : pos + 60]!r}", lasting=True)
        body = frame.end()
        stop = body + int(total)
        if stop + 2 > size:
            return -1  # the payload is not complete
        cursor = self.cursors.get(int(sid))
        if cursor is not None:
            if seq is not None or seq2 is not None:
                n = int(seq or seq2)
                if n != cursor.last + 1:
                    cursor.gaps.append(cursor.last + 1)
                cursor.last = n
                cursor.received.append((n, with_revision(buffer[body + int(headers or 0) : stop], n)))
                if cursor not in touched:
                    touched.append(cursor)
            elif h:
                line = buffer[body : buffer.find(_CRLF, body, stop)]
                cursor.status(bytes(subject), line)
            else:
                raise ReaderUnavailable(f"a message without a reply: {buffer[pos : pos + 60]!r}", lasting=True)
        return stop + 2

    def _control(self, line: bytes) -> None:
        if line == b"PING":
            self._write(b"PONG\r\n")
        elif line.startswith(b"-ERR"):
            raise ReaderUnavailable(f"the server said {line.decode(errors='replace')}")
        elif not line.startswith((b"INFO ", b"PONG", b"+OK")):  # INFO: cluster updates; nothing to do
            raise ReaderUnavailable(f"unexpected {line[:60]!r}", lasting=True)

    def _handshake_lines(self) -> None:
        buffer = self._buffer
        while (eol := buffer.find(_CRLF)) >= 0 and not (self._lines and self._lines[-1] == b"PONG"):
            self._lines.append(bytes(buffer[:eol]))
            del buffer[: eol + 2]
        if self._handshake is not None and not self._handshake.done() and self._lines:
            self._handshake.set_result(None)

    def _lost(self, error: ReaderUnavailable) -> None:
        self.open = False
        if self.error is None:
            self.error = error
        for cursor in list(self.cursors.values()):
            cursor.fail(error)
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_result(None)
        if self.transport is not None:
            self.transport.close()

    # --- requests -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ReaderUnavailable("the connection is closed")
        self.transport.write(data)

    def cursor(self, consumer: str, start: int, end: int) -> _Cursor:
        """A cursor on ``consumer``, on a new subscription (its inbox is ``<prefix>.<sid>``)."""
        if not self.open:
            raise self.error or ReaderUnavailable("the connection is closed")
        self._next_sid += 1
        cursor = _Cursor(self, consumer, self._next_sid, start, end)
        self.cursors[cursor.sid] = cursor
        self._write(b"SUB %s.%d.* %d\r\n" % (self.prefix.encode(), cursor.sid, cursor.sid))
        return cursor

    def pull(self, cursor: _Cursor, batch: int) -> None:
        request = b'{"batch":%d,"no_wait":true,"max_bytes":%d}' % (batch, PULL_BYTES)
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{cursor.consumer} {self.prefix}.{cursor.sid}.{cursor.pulls}"
        try:
            self._write(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(request), request))
        except ReaderUnavailable as exc:
            cursor.fail(exc)

    def drop(self, cursor: _Cursor) -> None:
        """Unsubscribe the cursor and delete its consumer (no answer awaited)."""
        cursor.fail(ReaderUnavailable("the cursor was dropped"))
        if self.cursors.pop(cursor.sid, None) is None or not self.open:
            return
        subject = f"$JS.API.CONSUMER.DELETE.{self.stream}.{cursor.consumer}".encode()
        with contextlib.suppress(ReaderUnavailable):
            self._write(b"UNSUB %d\r\nPUB %s %s.deleted 0\r\n\r\n" % (cursor.sid, subject, self.prefix.encode()))

    def abort(self, reason: str) -> None:
        self._lost(ReaderUnavailable(reason))


#: What a scan gives of a message: its subject, its stream sequence and the value of one header.
Scanned: TypeAlias = tuple[str, int, bytes | None]


class _ScanWire(_Wire):
    """A connection that reads one headers-only pull consumer until it has no more messages.

    What it keeps of each message: its subject, its stream sequence and the
    value of one header (``header``; none if ``None``), only until
    :meth:`scan` hands it on. Pulls of :data:`SCAN_PULL` messages, one after
    the other, the next one asked for by :meth:`scan` when it takes the
    messages of the last one: what is kept here is never more than a pull.
    The scan ends when a pull's message says nothing is pending after it, or
    a pull ends with ``404 No Messages`` (or ``408``): the consumer has
    delivered every message there was.
    """

    def __init__(self, endpoint: Endpoint, consumer_subject: str, header: bytes | None) -> None:
        super().__init__(endpoint, "")
        self.next_subject = consumer_subject
        self.header = header
        self.found: list[Scanned] = []  # since the last batch handed on
        self.pulls = 0
        self.batch = 0  # messages the pull in flight asked for
        self.in_pull = 0  # messages it has delivered
        self.pending = -1  # what the last message said is pending after it
        self.finished = False
        self.pull_due = False  # the pull in flight is complete and more is pending: scan() asks for the next
        self.news = 0
        self.waiter: asyncio.Future[None] | None = None

    async def scan(self, timeout: float, each: Callable[[list[Scanned]], None]) -> None:
        """Hand every message's ``(subject, stream sequence, header value)`` to ``each``, in stream order.

        In batches, as they arrive: each batch is what was parsed since the
        last one (at most one pull, in practice a few socket reads), and is
        not kept here once handed on. The next pull is asked for when the
        messages of the last one are taken, before they are handed on, so
        the server sends it while ``each`` works.
        """
        self._write(b"SUB %s.* 1\r\n" % self.prefix.encode())
        self._pull()
        while True:
            batch, self.found = self.found, []
            if self.pull_due:
                self.pull_due = False
                self._next_pull()
            if batch:
                each(batch)
            if self.error is not None:
                raise self.error
            if self.finished:
                return
            self.waiter = asyncio.get_running_loop().create_future()
            before = self.news
            try:
                await asyncio.wait_for(self.waiter, timeout)
            except TimeoutError:
                if self.news == before:
                    raise ReaderUnavailable(f"no message within {timeout:g} s of a scan") from None
            finally:
                self.waiter = None

    def _pull(self) -> None:
        self.pulls += 1
        self.batch, self.in_pull = SCAN_PULL, 0
        request = b'{"batch":%d,"no_wait":true}' % SCAN_PULL
        subject = f"{self.next_subject} {self.prefix}.{self.pulls}".encode()
        self._write(b"PUB %s %d\r\n%s\r\n" % (subject, len(request), request))

    def _wake(self) -> None:
        self.news += 1
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _lost(self, error: ReaderUnavailable) -> None:
        super()._lost(error)
        self._wake()

    def data_received(self, data: bytes) -> None:
        if not self.open:
            super().data_received(data)
            return
        buffer = self._rest + data if self._rest else data
        pos, size = 0, len(buffer)
        found, header, match = self.found, self.header, _SCAN_FRAME.match
        try:
            while pos < size:
                if buffer[pos] not in _FRAME_STARTS:
                    eol = buffer.find(_CRLF, pos)
                    if eol < 0:
                        break
                    self._control(buffer[pos:eol])
                    pos = eol + 2
                    continue
                frame = match(buffer, pos)
                if frame is None:
                    if buffer.find(_CRLF, pos) < 0:
                        break  # the frame's first line is not complete
                    raise ReaderUnavailable(f"unexpected frame {buffer[pos : pos + 60]!r}", lasting=True)
                h, subject, _sid, ack, headers, total = frame.groups()
                body = frame.end()
                stop = body + int(total)
                if stop + 2 > size:
                    break  # the payload is not complete
                if not h or headers is None:  # a headers-only consumer always sends headers
                    raise ReaderUnavailable(f"unexpected frame {buffer[pos : pos + 60]!r}", lasting=True)
                pos = stop + 2
                if ack is None:
                    self._status(subject, buffer[body : buffer.find(_CRLF, body, stop)])
                    continue
                tokens = ack.split(b".")
                if len(tokens) == 7:  # <stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
                    seq, pending = tokens[3], tokens[6]
                elif len(tokens) >= 9:  # <domain>.<account hash>.<stream>. ... as above
                    seq, pending = tokens[5], tokens[8]
                else:
                    raise ReaderUnavailable(f"unexpected reply $JS.ACK.{ack[:60]!r}", lasting=True)
                value = header_value(buffer[body : body + int(headers)], header) if header is not None else None
                found.append((subject.decode(), int(seq), value))
                self.in_pull += 1
                self.pending = int(pending)
        except (ReaderUnavailable, ValueError) as exc:
            self._rest = b""
            self._lost(exc if isinstance(exc, ReaderUnavailable) else ReaderUnavailable(str(exc), lasting=True))
            return
        self._rest = buffer[pos:]
        if self.pulls and not self.finished and self.in_pull >= self.batch:  # (no pull before scan())
            if self.pending == 0:
                self.finished = True
            else:
                self.pull_due = True
        self._wake()

    def _next_pull(self) -> None:
        try:
            self._pull()
        except ReaderUnavailable as exc:
            self._lost(exc)

    def _status(self, subject: bytes, line: bytes) -> None:
        if not subject.endswith(b".%d" % self.pulls) or self.finished or self.in_pull >= self.batch:
            return  # news of a pull whose messages all came: the next one is out, or about to be
        code = line[9:12]
        if code in (b"404", b"408"):
            self.finished = True  # the consumer has no more messages
        else:
            raise ReaderUnavailable(f"a scan's pull ended with {line.decode(errors='replace')!r}")


class JetStreamReader:
    """Reads ``stream``'s history through cursors on a connection of its own.

    ``create_consumer(start)`` makes a pull consumer (no acks, delivering
    from sequence ``start`` on) and returns its name; the store makes it
    through nats-py, as it does every other JetStream request.
    """

    def __init__(
        self,
        stream: str,
        create_consumer: Callable[[int], Awaitable[str]],
        *,
        tls: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        self._stream = stream
        self._create_consumer = create_consumer
        self._tls = tls
        self._timeout = timeout
        self._wire: _Wire | None = None
        self._opening = asyncio.Lock()
        self._cursors: OrderedDict[int, _Cursor] = OrderedDict()  # by the position their next read starts at
        self._paused_until = 0.0
        self._closed = False  # by close(): no read opens a connection again

    @property
    def paused(self) -> bool:
        """Whether the reader is not to be tried now (after it was refused, or for good, or closed)."""
        return self._closed or time.monotonic() < self._paused_until

    def failed(self, error: ReaderUnavailable) -> None:
        """Note a failure: pause if the error says so; close the connection unless only a cursor failed."""
        if error.lasting:
            self._paused_until = float("inf")
        elif error.pause:
            self._paused_until = time.monotonic() + error.pause
        if error.lasting or error.pause or self._wire is None or not self._wire.open:
            self._reset()

    def continues(self, start: int) -> bool:
        """Whether a read from ``start`` continues a cursor (a catch-up's next call)."""
        self._drop_idle()
        cursor = self._cursors.get(start)
        return cursor is not None and cursor.error is None and cursor.wire is self._wire

    async def read(self, url: ParseResult, start: int, end: int, limit: int) -> Chunk:
        """Up to ``limit`` messages from ``start`` up to ``end``, in order (see :class:`Chunk`).

        Fewer (maybe none) when the consumer had no more messages at the
        time; none above ``end``. A continuing cursor's consumer skips what
        retention removed since: that shows as a gap. Raises
        :class:`ReaderUnavailable` when this read cannot be served: nothing
        of it is returned then.
        """
        wire = await self._connected(Endpoint.of(url, self._tls))
        self._drop_idle()
        cursor = self._cursors.pop(start, None)
        if cursor is not None and cursor.wire is not wire:
            cursor = None
        if cursor is None:
            cursor = wire.cursor(await self._create_consumer(start), start, end)
        try:
            out = await cursor.read(end, limit, self._timeout)
        except BaseException:
            wire.drop(cursor)
            raise
        if cursor.next > end:
            wire.drop(cursor)  # the caller has what it wanted: a catch-up reads no further
        else:
            replaced = self._cursors.pop(cursor.next, None)
            if replaced is not None:
                replaced.wire.drop(replaced)
            self._cursors[cursor.next] = cursor
            while len(self._cursors) > KEPT:
                _, oldest = self._cursors.popitem(last=False)
                oldest.wire.drop(oldest)
        return out

    def discard(self, start: int) -> None:
        """Drop the cursor kept for a read from ``start``, if any (what it read ahead is not to be served)."""
        cursor = self._cursors.pop(start, None)
        if cursor is not None:
            cursor.wire.drop(cursor)

    def _drop_idle(self) -> None:
        """Drop the cursors unread for :data:`IDLE` seconds (kept in the order of their last reads)."""
        since = time.monotonic() - IDLE
        while self._cursors:
            start, cursor = next(iter(self._cursors.items()))
            if cursor.used >= since:
                return
            self.discard(start)

    async def scan(
        self,
        url: ParseResult,
        stream: str,
        consumer: str,
        header: bytes | None,
        each: Callable[[list[Scanned]], None],
    ) -> None:
        """Hand ``each`` what a headers-only pull consumer (no acks) of ``stream`` delivers, until it has no more.

        ``(subject, stream sequence, value of header)`` each, in stream
        order, in batches as they arrive (see :meth:`_ScanWire.scan`), read
        on a connection of its own that is closed at the end. Memory: a
        batch or two, never the whole stream. Raises
        :class:`ReaderUnavailable` when the scan cannot be done or finished:
        ``each`` may have had some batches by then.
        """
        if self._closed:
            raise ReaderUnavailable("the reader is closed", lasting=True)
        endpoint = Endpoint.of(url, self._tls)
        wire = _ScanWire(endpoint, f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", header)
        try:
            try:
                await wire.connect(self._timeout)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                raise ReaderUnavailable(f"cannot connect to {endpoint.host}:{endpoint.port}: {exc!r}") from None
            await wire.scan(self._timeout, each)
        finally:
            wire.abort("the scan is over")

    async def _connected(self, endpoint: Endpoint) -> _Wire:
        async with self._opening:
            if self._closed:
                raise ReaderUnavailable("the reader is closed", lasting=True)
            wire = self._wire
            if wire is not None and wire.open and wire.endpoint == endpoint:
                return wire
            self._reset()
            wire = _Wire(endpoint, self._stream)
            try:
                await wire.connect(self._timeout)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                wire.abort(str(exc))
                raise ReaderUnavailable(f"cannot connect to {endpoint.host}:{endpoint.port}: {exc!r}") from None
            except BaseException:
                wire.abort("the handshake failed")
                raise
            if self._closed:  # while the handshake went on
                wire.abort("the reader is closed")
                raise ReaderUnavailable("the reader is closed", lasting=True)
            self._wire = wire
            return wire

    def close(self) -> None:
        """Drop every cursor (their consumers deleted) and close the connection, for good."""
        self._closed = True
        self._reset()

    def _reset(self) -> None:
        """Drop every cursor (their consumers deleted) and close the connection: the next read opens another."""
        cursors, self._cursors = list(self._cursors.values()), OrderedDict()
        for cursor in cursors:
            cursor.wire.drop(cursor)
        wire, self._wire = self._wire, None
        if wire is not None:
            for cursor in list(wire.cursors.values()):
                wire.drop(cursor)
            wire.open = False
            if wire.transport is not None:
                wire.transport.close()
