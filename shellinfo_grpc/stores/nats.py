"""A store on NATS JetStream, so that several replicas of the service share one history.

Two JetStream streams hold the store:

* the **history**: one stream with every accepted update, trimmed by the
  retention policy. The **revision is its stream sequence**, so the order is
  global across all replicas. Each run has its own subject,
  ``<prefix>.<source token>.<jobRunId>``.
* the **latest state**: a key-value bucket (``<stream>_LATEST`` by default:
  one message per key, no age or count limit) whose key
  ``<source token>.<jobRunId>`` holds the run's latest update, revision
  included. Retention never touches it, so a run is known, and its final
  status enforced, for as long as the bucket exists.

How the service's rules hold across replicas:

* **Idempotence and final statuses.** A publish decides on the update against
  the run's latest state (:func:`shellinfo_grpc.stores.decide`) and writes the
  history with the header ``Nats-Expected-Last-Subject-Sequence`` set to the
  revision it decided on (0 when the run has no message left in the history).
  If another replica wrote the run in between, JetStream refuses the write
  (error 10071) and the publish reads the run again and starts over, up to
  ``max_attempts`` times. Two replicas can therefore never both record a change
  from the same state, a final status stays final, and a retried publish
  whose first attempt did land finds an identical state and returns its
  revision.
* **Both writes, or no acknowledgement.** After the history accepted the
  update, the bucket is written with optimistic concurrency too (expected
  last sequence of the key; a write never replaces a newer revision). Only
  then is the publish acknowledged. A replica that dies between the two
  writes leaves the history one update ahead of the bucket for that run;
  the next publish of the run (which finds the history ahead when JetStream
  refuses its write) and every replica's start (which compares the last
  message of every run in the history with the bucket) copy the update
  into the bucket before anything else.
* **One round trip in the common case.** Each replica remembers the latest
  state of recently written runs from its live feed; a publish on such a
  run writes straight away, and JetStream's expected-sequence check tells it
  when what it remembered was stale. Decisions that would not write (no-op,
  refusal) are always taken on a fresh read.
* **Nothing acknowledged that was not stored.** An update is acknowledged only
  after JetStream's acknowledgements of both writes (each stored on a quorum of
  the stream's replicas). When NATS cannot be reached, publishes fail with
  :class:`~shellinfo_grpc.errors.StoreUnavailable` (gRPC ``UNAVAILABLE``); the
  client reconnects by itself and the store works again when NATS returns.
* **Live updates.** Each replica follows the history with an ordered consumer
  and tells its listeners about every message in sequence order, whichever
  replica published it. A second ordered consumer follows the bucket's keys
  (headers only), which keeps a sorted index of every run: ``ListRuns`` reads
  one page of keys from it and only those runs' values, O(page size).
* **Catch-up** hands on stored bytes with the revision appended, as the
  SQLite store hands on its stored rows: from each replica's in-memory
  window of the newest history (``window_mib``, kept from its live feed,
  and filled with the history before it in the background after a start)
  when it covers the range, else from JetStream: through the lean reader of
  :mod:`~shellinfo_grpc.stores._jetstream_reader` (a connection of its own,
  one pull consumer per catch-up, pulls of up to 16,384 messages read ahead
  while the previous ones are sent), or through nats-py (an ephemeral pull
  consumer per 1,000 messages) when the reader cannot serve the connection.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import itertools
import json
import logging
import os
import random
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from shellinfo_grpc._gen.shellinfo.v1 import protection_job_pb2 as _job_pb
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as _pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc
from shellinfo_grpc.errors import ConfigurationError, HistoryExpired, RunRejected, StoreUnavailable
from shellinfo_grpc.rules import compile_filter
from shellinfo_grpc.stores import Item, PublishOutcome, Retention, Store, decide, new_update, now_usecs
from shellinfo_grpc.stores._jetstream_reader import (
    Chunk,
    JetStreamReader,
    ReaderUnavailable,
    Scanned,
    checked,
    with_revision,
)

__all__ = ["PAUSE_HOOK_ENV", "NatsStore"]

_log = logging.getLogger("shellinfo_grpc.nats_store")  # its name before the move, kept for log filters

_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
#: The revision a bucket entry holds, also in a header: the key feed reads headers only.
_REVISION_HEADER: Final = "Shellinfo-Revision"
_WRONG_LAST_SEQUENCE: Final = 10071
_OPTIONS: Final = frozenset(
    {
        "stream",
        "subject_prefix",
        "latest_bucket",
        "replicas",
        "creds",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "timeout",
        "max_attempts",
        "window_mib",
    }
)
# Errors that mean "NATS cannot be reached or did not answer in time".
_UNREACHABLE: Final = (nats.errors.Error, asyncio.TimeoutError, OSError)
#: How many runs' latest updates a replica remembers for one-round-trip publishes.
_REMEMBERED: Final = 65_536
#: The default size of a replica's in-memory window of the newest history (MiB).
_WINDOW_MIB: Final = 64
#: Most messages one stretch of the window's warm-up reads (and holds before it is put in the window).
_WARM_MESSAGES: Final = 65_536
#: Messages one read of the warm-up asks for (the reader pulls ahead of it).
_WARM_READ: Final = 8_192
#: Messages and bytes per pull of the history through nats-py.
_BATCH: Final = 1000
_BATCH_BYTES: Final = 8 << 20
#: The connection options the history reader does as nats-py does (creds files, nkeys ... it does not).
_READER_OPTIONS: Final = frozenset({"tls"})
#: Test hook: a publish whose run's ``error`` equals this value stops for good
#: between its history write and its bucket write (the crash-repair test kills
#: the process there). Never set in production.
PAUSE_HOOK_ENV: Final = "SHELLINFO_TEST_NATS_PAUSE_BETWEEN_WRITES"


def _source_token(source: str) -> str:
    """A subject token for ``source``: any text, even empty, becomes [A-Za-z0-9_-]+."""
    return "s" + base64.urlsafe_b64encode(source.encode("utf-8")).decode("ascii").rstrip("=")


def _run_key(token: str, job_run_id: str) -> tuple[str, int] | None:
    """The (source, jobRunId) of a subject's last two tokens, or None for a foreign subject."""
    if not token.startswith("s"):
        return None
    try:
        source = base64.urlsafe_b64decode(token[1:] + "=" * (-(len(token) - 1) % 4)).decode("utf-8")
        return source, int(job_run_id)
    except ValueError:
        return None


def _position(msg: Any) -> tuple[int, int]:
    """A consumer-delivered message's stream sequence and how many messages are pending after it.

    Read from the reply subject, ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
    seq>.<time>.<pending>``, which is cheaper than nats-py's ``metadata`` (other forms go through it).
    """
    tokens = msg.reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[8])
    meta = msg.metadata
    return meta.sequence.stream, meta.num_pending


def _chunk(start: int, messages: list[tuple[int, bytes]]) -> Chunk:
    """What the history reader hands out, for ``(sequence, stored bytes)`` read through nats-py from ``start``."""
    gaps: list[int] = []
    expected = start
    records: list[tuple[int, bytes]] = []
    for seq, data in messages:
        if seq != expected:
            gaps.append(expected)
        expected = seq + 1
        records.append((seq, with_revision(data, seq)))
    good, foreign = checked(records)
    return Chunk(good, gaps, foreign, expected)


class _Feed:
    """Where an ordered consumer has got to, and who waits for it to get further."""

    def __init__(self) -> None:
        self.position = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def advance(self, position: int) -> None:
        self.position = max(self.position, position)
        if self._waiters:
            waiting = []
            for wanted, waiter in self._waiters:
                if wanted <= position:
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    waiting.append((wanted, waiter))
            self._waiters = waiting

    async def reach(self, position: int, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until the feed has passed ``position``; whether it has."""
        if self.position >= position:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((position, waiter))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), timeout=timeout)
        return self.position >= position


class _Window:
    """The newest stretch of the history, as wire bytes (revision appended), kept from the live feed.

    Catch-up inside it is served from memory, at the speed of the SQLite
    store's reads; older revisions are read from JetStream in batches. It
    holds at most ``max_bytes`` (the oldest go first); every message from
    ``low`` up to the live feed's position is in it. After a start, the
    warm-up puts the history before the live feed's first message in front
    (:meth:`prepend`). Retention is not its business: every read checks the
    oldest revision first, so an entry retention removed is never served.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.low = 1
        self._seqs: list[int] = []
        self._wire: list[bytes] = []
        self._first = 0  # index of the oldest kept entry
        self._bytes = 0

    def restart(self, position: int) -> None:
        """Forget everything: the feed goes on after ``position``."""
        self._seqs, self._wire, self._first, self._bytes = [], [], 0, 0
        self.low = position + 1

    def add(self, seq: int, wire: bytes) -> None:
        if not self.max_bytes:
            self.low = seq + 1
            return
        self._seqs.append(seq)
        self._wire.append(wire)
        self._bytes += len(wire)
        while self._bytes > self.max_bytes and self._first < len(self._seqs):
            self._bytes -= len(self._wire[self._first])
            self.low = self._seqs[self._first] + 1
            self._first += 1
        if self._first > 4096 and self._first * 2 > len(self._seqs):
            del self._seqs[: self._first], self._wire[: self._first]
            self._first = 0

    @property
    def room(self) -> int:
        """Bytes it can take before the oldest go."""
        return self.max_bytes - self._bytes

    def prepend(self, start: int, end: int, entries: list[tuple[int, bytes]]) -> bool:
        """Put the history ``[start, end]`` (its RunUpdates, ``entries``) in front: as much of its newest part as fits.

        Only if it ends right where the window begins (``end + 1 == low``):
        otherwise the window changed meanwhile (its oldest went, or it
        restarted) and nothing is taken. Whether all of it was taken.
        """
        if not self.max_bytes or end + 1 != self.low:
            return False
        room, i = self.room, len(entries)
        while i and len(entries[i - 1][1]) <= room:
            i -= 1
            room -= len(entries[i][1])
        kept = entries[i:]
        self._seqs = [seq for seq, _ in kept] + self._seqs[self._first :]
        self._wire = [wire for _, wire in kept] + self._wire[self._first :]
        self._first = 0
        self._bytes = self.max_bytes - room
        self.low = entries[i - 1][0] + 1 if i else start
        return not i

    def read(self, start: int, end: int, limit: int) -> list[tuple[int, bytes]]:
        """The kept messages with ``start <= seq <= end``, at most ``limit``; the caller checked ``start >= low``."""
        i = bisect.bisect_left(self._seqs, start, lo=self._first)
        j = min(bisect.bisect_right(self._seqs, end, lo=i), i + limit)
        return list(zip(self._seqs[i:j], self._wire[i:j], strict=True))


class NatsStore(Store):
    """A :class:`~shellinfo_grpc.stores.Store` on a JetStream stream and a key-value bucket.

    ``servers``: NATS URLs (``nats://host:port``, with credentials in the URL
    if needed). ``stream``/``subject_prefix``: where the history lives;
    ``latest_bucket``: the key-value bucket of latest states (default
    ``<stream>_LATEST``). Both are created on start if missing, with
    ``replicas`` copies; the retention limits apply to the history only.
    ``connect_options`` go to ``nats.connect`` (``tls``, ``user_credentials``,
    ...). ``timeout``: seconds for each JetStream request. ``max_attempts``:
    how often a publish retries when other replicas keep writing the same run.
    ``window_mib``: how much of the newest history each replica keeps in
    memory for catch-up (0: none; every catch-up reads JetStream).
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        stream: str = "SHELLINFO_RUNS",
        subject_prefix: str = "shellinfo.runs",
        latest_bucket: str | None = None,
        replicas: int = 1,
        retention: Retention | None = None,
        connect_options: Mapping[str, Any] | None = None,
        timeout: float = 5.0,
        max_attempts: int = 10,
        window_mib: float = _WINDOW_MIB,
    ) -> None:
        super().__init__()
        if not servers:
            raise ConfigurationError("NATS store: no server given")
        if not stream or any(c in stream for c in ". *>\t"):
            raise ConfigurationError(f"NATS store: stream name {stream!r} must be one token without . * >")
        if not subject_prefix or any(c in subject_prefix for c in " *>\t") or subject_prefix.endswith("."):
            raise ConfigurationError(f"NATS store: subject prefix {subject_prefix!r} is not a valid subject")
        bucket = latest_bucket if latest_bucket is not None else f"{stream}_LATEST"
        if not bucket or not all(c.isascii() and (c.isalnum() or c in "_-") for c in bucket):
            raise ConfigurationError(
                f"NATS store: latest_bucket {bucket!r} must be letters, digits, _ and - only"
                + ("" if latest_bucket is not None else " (it defaults to <stream>_LATEST: give latest_bucket)")
            )
        if window_mib < 0:
            raise ConfigurationError("NATS store: window_mib must not be negative")
        if replicas < 1 or max_attempts < 1 or timeout <= 0:
            raise ConfigurationError("NATS store: replicas, max_attempts and timeout must be positive")
        self._servers = list(servers)
        self._stream = stream
        self._prefix = subject_prefix
        self._bucket = bucket
        self._latest_stream = f"KV_{bucket}"
        self._latest_prefix = f"$KV.{bucket}"
        self._replicas = replicas
        self._retention = retention or Retention()
        self._connect_options = dict(connect_options or {})
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._pause_on = os.environ.get(PAUSE_HOOK_ENV) or None
        self._nc: Any = None
        self._js: Any = None
        self._jsm: Any = None
        self._live: Any = None
        self._keys_feed: Any = None
        self._history_feed = _Feed()  # position: the newest history sequence followed
        self._window = _Window(int(window_mib * (1 << 20)))
        self._latest_feed = _Feed()  # position: the newest bucket sequence followed
        # Every run's (revision, bucket sequence), from the key feed and this replica's writes,
        # and the runs' keys in order: the ListRuns index.
        self._latest: dict[tuple[str, int], tuple[int, int]] = {}
        self._keys: list[tuple[str, int]] = []
        # The latest update of recently written runs, by history subject (LRU).
        self._remembered: OrderedDict[str, _svc.RunUpdate] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}
        self._connect_failures = 0
        self._outage_errors = 0
        self._keys_live = False
        self._keys_loading = False
        self._history_keeps_long = False
        self._reader: JetStreamReader | None = None
        self._reader_said = False
        self._warming: asyncio.Task[None] | None = None

    # --- configuration -----------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, options: Mapping[str, str], retention: Retention | None = None) -> NatsStore:
        """Build a store from a ``--store`` URL.

        ``nats://[user:password@]host:port[,host:port...]?stream=...&subject_prefix=...&replicas=3``
        (``latest_bucket=...`` names the bucket of latest states);
        ``creds=PATH`` for a credentials file; ``tls_ca``, ``tls_cert``,
        ``tls_key`` (PEM paths) for TLS (``tls://`` also turns TLS on).
        """
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigurationError(f"store URL {url!r}: unknown option(s) {', '.join(sorted(unknown))}")
        parts = urlsplit(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        if not hosts:
            raise ConfigurationError(f"store URL {url!r}: give at least one host:port")
        prefix = f"{userinfo}@" if userinfo else ""
        servers = [f"{parts.scheme}://{prefix}{host}" for host in hosts.split(",") if host]
        connect: dict[str, Any] = {}
        if "creds" in options:
            creds = Path(options["creds"]).expanduser()
            if not creds.is_file():
                raise ConfigurationError(f"store URL {url!r}: credentials file {creds} not found")
            connect["user_credentials"] = str(creds)
        if parts.scheme == "tls" or {"tls_ca", "tls_cert", "tls_key"} & set(options):
            connect["tls"] = _tls_context(options)
        try:
            return cls(
                servers,
                stream=options.get("stream", "SHELLINFO_RUNS"),
                subject_prefix=options.get("subject_prefix", "shellinfo.runs"),
                latest_bucket=options.get("latest_bucket"),
                replicas=int(options.get("replicas", "1")),
                retention=retention,
                connect_options=connect,
                timeout=float(options.get("timeout", "5")),
                max_attempts=int(options.get("max_attempts", "10")),
                window_mib=float(options.get("window_mib", str(_WINDOW_MIB))),
            )
        except ValueError as exc:
            raise ConfigurationError(f"store URL {url!r}: {exc}") from None

    def _shown_servers(self) -> str:
        """The server URLs for messages, without passwords or tokens."""
        shown = []
        for server in self._servers:
            parts = urlsplit(server)
            host = parts.netloc.rpartition("@")[2]
            shown.append(f"{parts.scheme}://{'***@' if '@' in parts.netloc else ''}{host}")
        return ", ".join(shown)

    def _subjects(self, source: str, job_run_id: int) -> tuple[str, str]:
        """The run's subject in the history, and in the bucket of latest states."""
        tail = f"{_source_token(source)}.{job_run_id}"
        return f"{self._prefix}.{tail}", f"{self._latest_prefix}.{tail}"

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create what is missing, index the runs, repair, and follow the history from its head."""
        self._connect_failures = 0
        connect = nats.connect(
            self._servers,
            name="shellinfo-grpc",
            max_reconnect_attempts=-1,  # keep trying: the service recovers when NATS returns
            reconnect_time_wait=0.5,
            connect_timeout=max(1, int(self._timeout)),
            allow_reconnect=True,
            error_cb=self._on_nats_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            **self._connect_options,
        )
        try:
            # nats-py retries a first connection as long as later ones: bound it,
            # so that a wrong address fails start-up instead of hanging it.
            self._nc = await asyncio.wait_for(connect, timeout=2 * self._timeout)
        except (*_UNREACHABLE, TimeoutError) as exc:
            reason = f"no answer within {2 * self._timeout:g} s" if isinstance(exc, TimeoutError) else str(exc)
            attempts = self._connect_failures
            raise ConfigurationError(
                f"NATS store: cannot connect to {self._shown_servers()}: {reason}"
                + (f" ({attempts} failed attempts)" if attempts > 1 else "")
            ) from None
        self._connect_failures = -1  # connected once: from now on, outages are logged
        self._js = self._nc.jetstream(timeout=self._timeout)
        self._jsm = self._nc.jsm(timeout=self._timeout)
        unsupported = sorted(set(self._connect_options) - _READER_OPTIONS)
        if unsupported:
            self._reader = None
            self._say_reader(f"connection option(s) {', '.join(unsupported)}")
        else:
            tls = self._connect_options.get("tls")
            self._reader = JetStreamReader(self._stream, self._cursor_consumer, tls=tls, timeout=self._timeout)
        try:
            info = await self._ensure_stream()
            max_msgs, max_age = info.config.max_msgs or -1, info.config.max_age or 0
            self._history_keeps_long = (max_msgs < 0 or max_msgs >= 10_000) and (not max_age or max_age >= 60)
            await self._ensure_bucket()
            await self._follow_keys()
            repaired = await self._repair_all()
            if repaired:
                _log.warning("bucket %s: copied %d run(s) the history had ahead of it", self._bucket, repaired)
            head = max(info.state.last_seq, self._history_feed.position)
            self._history_feed.advance(head)
            self._window.restart(head)
            # From here on the window's low only rises, until the warm-up (below) lowers it.
            self._live = await self._js.subscribe(
                f"{self._prefix}.>",
                stream=self._stream,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                config=api.ConsumerConfig(opt_start_seq=head + 1),
                cb=self._on_message,
                idle_heartbeat=2.0,
            )
        except (*_UNREACHABLE, StoreUnavailable) as exc:
            await self._nc.close()
            raise ConfigurationError(f"NATS store: cannot set up stream {self._stream}: {exc}") from None
        if self._window.max_bytes and head:
            self._warming = asyncio.create_task(self._warm(head))

    async def _warm(self, head: int) -> None:
        """Fill the window with the newest history up to ``head`` (where the live feed began), in the background.

        Backwards in stretches of at most :data:`_WARM_MESSAGES`, each read
        forward through the history reader (nats-py if it cannot) and put in
        front of the window, until the window is full or the oldest revision
        is reached. The live feed appends meanwhile; a stretch is taken only
        if it still ends where the window begins. Any failure leaves the
        window as it is (said once). Catch-ups meanwhile read JetStream.
        """
        window = self._window
        began, taken, high = time.monotonic(), 0, head
        try:
            state = (await self._jsm.stream_info(self._stream)).state
            if not state.messages:
                return
            per = max(1.0, state.bytes / state.messages)  # stored bytes a message: more than its wire form
            while high >= state.first_seq and window.room > 0:
                count = min(_WARM_MESSAGES, max(1024, int(1.1 * window.room / per)))
                low = max(state.first_seq, high - count + 1)
                entries = await self._read_all(low, high)
                if entries:
                    per = sum(len(wire) for _, wire in entries) / len(entries)
                whole = window.prepend(low, high, entries)
                if window.low > high:  # not taken: the window moved on (it filled, or restarted)
                    break
                taken += high - window.low + 1
                if not whole:
                    break
                high = low - 1
        except Exception as exc:  # a failure only leaves the window as it is (cancelling is no Exception)
            _log.warning("stream %s: the window was not warmed below revision %d: %s", self._stream, high + 1, exc)
            return
        _log.debug(
            "stream %s: window warmed with revisions %d..%d (%d) in %.2f s",
            self._stream,
            window.low,
            head,
            taken,
            time.monotonic() - began,
        )

    async def _read_all(self, start: int, end: int) -> list[tuple[int, bytes]]:
        """Every RunUpdate of the history in ``[start, end]`` (which exists: ``end`` is not above the head).

        Gaps are not checked: a deleted message is not there, and one that
        retention trimmed is below the oldest revision, which no read is
        served from. Foreign messages are left out quietly: a catch-up says them.
        """
        out: list[tuple[int, bytes]] = []
        fetches = self._fetches(end)
        for index, fetch in enumerate(fetches):
            position = start
            try:
                while position <= end:
                    chunk = await fetch(position, min(_WARM_READ, end - position + 1))
                    if chunk.next <= position:
                        raise StoreUnavailable(f"NATS store: stream {self._stream} returned nothing at {position}")
                    out += chunk.records
                    position = chunk.next
            except ReaderUnavailable as exc:
                if self._reader is not None:
                    self._reader.failed(exc)
                self._say_reader(str(exc))
                if index == len(fetches) - 1:
                    raise
                out = []
                continue
            return out
        return out

    async def _ensure_stream(self) -> Any:
        try:
            return await self._jsm.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            pass
        config = api.StreamConfig(
            name=self._stream,
            subjects=[f"{self._prefix}.>"],
            storage=api.StorageType.FILE,
            num_replicas=self._replicas,
            max_msgs=self._retention.max_updates or -1,
            max_age=self._retention.max_age_seconds or None,
            discard=api.DiscardPolicy.OLD,
            allow_direct=True,
        )
        await self._jsm.add_stream(config)
        return await self._jsm.stream_info(self._stream)

    async def _ensure_bucket(self) -> None:
        """The key-value bucket of latest states: one entry per run, no limits."""
        try:
            await self._jsm.stream_info(self._latest_stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        await self._js.create_key_value(
            api.KeyValueConfig(
                bucket=self._bucket,
                description=f"latest state of every run of stream {self._stream} (shellinfo-grpc)",
                history=1,
                storage=api.StorageType.FILE,
                replicas=self._replicas,
                direct=True,
            )
        )

    async def _follow_keys(self) -> None:
        """Load every key of the bucket, then follow its keys from there on; return once the index is complete.

        The load is a scan through the history reader's connection (see
        :meth:`_scan`); the key feed (an ordered consumer, headers only) then
        starts right after the newest message the scan saw, or after the
        bucket's last sequence as it was before the scan if that is newer:
        every message up to there that still existed was scanned, so no key is
        missed, and none is counted twice. The scan's batches go into the index
        as they arrive. When the reader cannot scan, or stops midway, the key
        feed itself starts from the bucket's first message and is waited for:
        what a failed scan put into the index is then delivered again, and
        :meth:`_note_latest` takes a key's message once (by its bucket
        sequence), so the index ends as if nats-py had read it all.
        """
        last = (await self._jsm.stream_info(self._latest_stream)).state.last_seq
        self._keys_loading = True
        newest = 0  # the newest message the scan saw

        def load(batch: list[Scanned]) -> None:
            nonlocal newest
            note, run_key = self._note_latest, _run_key
            for subject, seq, revision in batch:
                key = run_key(*subject.rsplit(".", 2)[-2:])
                if key is not None and revision is not None and revision.isdigit():
                    note(key, int(revision), seq)
            newest = batch[-1][1]  # batches come in stream order

        if not last or await self._scan(self._latest_stream, api.DeliverPolicy.ALL, load, _REVISION_HEADER):
            position = max(last, newest)
            self._latest_feed.advance(position)
            deliver = {
                "deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE,
                "config": api.ConsumerConfig(opt_start_seq=position + 1),
            }
        else:
            deliver = {"deliver_policy": api.DeliverPolicy.ALL}
        self._keys_feed = await self._js.subscribe(
            f"{self._latest_prefix}.>",
            stream=self._latest_stream,
            ordered_consumer=True,
            headers_only=True,
            cb=self._on_key,
            idle_heartbeat=2.0,
            **deliver,
        )
        # Without a scan, the bucket's messages up to `last` arrive at the rate the feed takes
        # them: wait while it makes progress.
        while not await self._latest_feed.reach(last, self._timeout):
            before = self._latest_feed.position
            if not await self._latest_feed.reach(before + 1, self._timeout):
                raise StoreUnavailable(f"NATS store: the keys of bucket {self._bucket} stopped arriving")
        self._keys.sort()
        self._keys_loading = False
        self._keys_live = True

    async def _scan(
        self,
        stream: str,
        deliver: api.DeliverPolicy,
        each: Callable[[list[Scanned]], None],
        header: str | None = None,
    ) -> bool:
        """Hand ``each`` the (subject, stream sequence, value of header) of what ``deliver`` selects in ``stream``.

        In stream order, in batches as they arrive (at most a pull of
        :data:`~shellinfo_grpc.stores._jetstream_reader.SCAN_PULL` messages
        each), so that memory holds a batch, never the stream. Through the
        history reader's :meth:`~JetStreamReader.scan` on an ephemeral pull
        consumer (no acks, in memory), which costs about a microsecond a
        message where nats-py costs tens. ``False`` when the reader cannot do
        it (its connection options, a protocol surprise, a connection lost),
        maybe after ``each`` had some batches: the caller reads everything
        through nats-py then, so what it does with a message must give the
        same result when done twice.
        """
        reader = self._reader
        url = self._nc.connected_url if self._nc is not None else None
        if reader is None or url is None or reader.paused:
            return False
        subjects = f"{self._prefix}.>" if stream == self._stream else f"{self._latest_prefix}.>"
        config = api.ConsumerConfig(
            deliver_policy=deliver,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=subjects,
            headers_only=True,
            inactive_threshold=max(30.0, 4 * self._timeout),
            mem_storage=True,
            num_replicas=1,
        )
        consumer = str((await self._jsm.add_consumer(stream, config)).name)
        try:
            await reader.scan(url, stream, consumer, header.encode() if header is not None else None, each)
        except ReaderUnavailable as exc:
            reader.failed(exc)
            self._say_reader(str(exc))
            _log.info("stream %s: start-up scan through nats-py (%s)", stream, exc)
            return False
        else:
            return True
        finally:
            with contextlib.suppress(*_UNREACHABLE, nats.js.errors.Error):
                await self._jsm.delete_consumer(stream, consumer)

    async def close(self) -> None:
        """Stop following the streams and drain the connection."""
        nc, self._nc = self._nc, None
        if nc is None:
            return
        warming, self._warming = self._warming, None
        if warming is not None:
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
        if self._reader is not None:
            self._reader.close()
        for sub in (self._live, self._keys_feed):
            if sub is not None:
                with contextlib.suppress(*_UNREACHABLE):
                    await sub.unsubscribe()
        with contextlib.suppress(*_UNREACHABLE):
            await nc.drain()
        with contextlib.suppress(*_UNREACHABLE):
            await nc.close()

    async def _on_nats_error(self, exc: Exception) -> None:
        # nats-py reports each failed (re)connection attempt here, every
        # reconnect_time_wait: while the connection is down, say the first one
        # and count the others; the reconnection says the count. Before the
        # first connection, start() says it all in one error. One line, no
        # traceback, no credentials.
        if self._connect_failures >= 0:
            self._connect_failures += 1
            return
        nc = self._nc
        if nc is not None and (nc.is_reconnecting or not nc.is_connected):
            self._outage_errors += 1
            if self._outage_errors > 1:
                return
            _log.warning(
                "NATS %s: %s: %s (retrying every 0.5 s; said once)", self._shown_servers(), type(exc).__name__, exc
            )
            return
        _log.warning("NATS %s: %s: %s", self._shown_servers(), type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        self._keys_live = False  # until the key feed has caught up again
        if self._connect_failures < 0 and self._nc is not None:
            _log.warning("NATS %s: disconnected; reconnecting", self._shown_servers())

    async def _on_reconnected(self) -> None:
        failed, self._outage_errors = self._outage_errors, 0
        _log.warning(
            "NATS %s: reconnected%s", self._shown_servers(), f" after {failed} failed attempt(s)" if failed else ""
        )

    async def _on_message(self, msg: Any) -> None:
        seq = _position(msg)[0]
        if seq <= self._history_feed.position:
            return  # delivered again after a reset of the ordered consumer
        update = self._decode(msg.data, seq)
        if update is None:
            self._remembered.pop(msg.subject, None)  # a foreign message: the next publish reads the run
        else:
            self._remember(msg.subject, update)
            self._window.add(seq, with_revision(msg.data, seq))
        self._history_feed.advance(seq)
        if update is not None:
            self.notify_listeners((update,))

    async def _on_key(self, msg: Any) -> None:
        seq, pending = _position(msg)
        headers = msg.headers or {}
        revision = headers.get(_REVISION_HEADER)
        key = _run_key(*msg.subject.rsplit(".", 2)[-2:])
        if key is not None and revision is not None and revision.isdigit():
            self._note_latest(key, int(revision), seq)
        self._keys_live = pending == 0
        self._latest_feed.advance(seq)

    def _note_latest(self, key: tuple[str, int], revision: int, bucket_seq: int) -> None:
        known = self._latest.get(key)
        if known is None:
            if self._keys_loading:
                self._keys.append(key)  # sorted once the start-up load is complete
            else:
                bisect.insort(self._keys, key)
        elif known[1] >= bucket_seq:
            return
        self._latest[key] = (revision, bucket_seq)

    def _remember(self, subject: str, update: _svc.RunUpdate) -> None:
        known = self._remembered.get(subject)
        if known is not None and known.revision >= update.revision:
            return
        self._remembered[subject] = update
        self._remembered.move_to_end(subject)
        if len(self._remembered) > _REMEMBERED:
            self._remembered.popitem(last=False)

    def _decode(self, data: bytes, seq: int) -> _svc.RunUpdate | None:
        try:
            update = _svc.RunUpdate.FromString(data)
        except Exception:  # a foreign message on our subjects: skip it, loudly
            _log.warning("stream %s: message %d is not a RunUpdate; skipped", self._stream, seq)
            return None
        update.revision = seq
        return update

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        error = StoreUnavailable(f"NATS store: {what}: {type(exc).__name__}: {exc}".rstrip(": "))
        error.__cause__ = exc
        return error

    # --- the two records of a run ---------------------------------------------------------

    async def _last_in_history(self, subject: str) -> tuple[int, _svc.RunUpdate | None]:
        """The sequence of the last message on ``subject`` in the history (0: none) and its update.

        The update is ``None`` when there is no message, or when the last one
        is not a RunUpdate (a foreign publisher): its sequence still counts for
        the optimistic write.
        """
        try:
            raw = await self._jsm.get_last_msg(self._stream, subject)
        except nats.js.errors.NotFoundError:
            return 0, None
        return raw.seq, self._decode(raw.data or b"", raw.seq)

    async def _latest_entry(self, subject: str) -> tuple[int, _svc.RunUpdate | None]:
        """The bucket's sequence of the run's entry (0: none) and its update (revision included)."""
        try:
            raw = await self._jsm.get_last_msg(self._latest_stream, subject)
        except nats.js.errors.NotFoundError:
            return 0, None
        try:
            return raw.seq, _svc.RunUpdate.FromString(raw.data or b"")
        except Exception:
            _log.warning("bucket %s: entry %s is not a RunUpdate; ignored", self._bucket, subject)
            return raw.seq, None

    async def _write_latest(self, key: tuple[str, int], subject: str, update: _svc.RunUpdate, bucket_seq: int) -> None:
        """Make the run's bucket entry ``update``, unless it already holds that revision or a newer one.

        ``bucket_seq`` is the entry's sequence as last known; when it is stale
        the entry is read again (another replica, or a repair, wrote it).
        """
        data = update.SerializeToString()
        for _ in range(self._max_attempts):
            headers = {_EXPECTED_LAST_SUBJECT_SEQ: str(bucket_seq), _REVISION_HEADER: str(update.revision)}
            try:
                ack = await self._js.publish(subject, data, stream=self._latest_stream, headers=headers)
            except nats.js.errors.APIError as exc:
                if exc.err_code != _WRONG_LAST_SEQUENCE:
                    raise
                bucket_seq, current = await self._latest_entry(subject)
                if current is not None and current.revision >= update.revision:
                    self._note_latest(key, current.revision, bucket_seq)
                    return
                continue
            self._note_latest(key, update.revision, ack.seq)
            return
        raise StoreUnavailable(f"NATS store: bucket {self._bucket}: entry {subject} kept changing; try again")

    async def _read_run(
        self, key: tuple[str, int], subject: str, latest_subject: str
    ) -> tuple[int, _svc.RunUpdate | None, int]:
        """The run as it is: (history sequence to expect, latest update, bucket sequence).

        When the history holds a newer update of the run than the bucket (its
        writer died between the two writes), the bucket is repaired first.
        """
        (expected, in_history), (bucket_seq, latest) = await asyncio.gather(
            self._last_in_history(subject), self._latest_entry(latest_subject)
        )
        if in_history is not None and (latest is None or in_history.revision > latest.revision):
            _log.warning("run %s: the history is ahead of bucket %s; repaired", subject, self._bucket)
            await self._write_latest(key, latest_subject, in_history, bucket_seq)
            bucket_seq, latest = self._latest[key][1], in_history
        return expected, latest, bucket_seq

    async def _repair_all(self) -> int:
        """Copy into the bucket every run whose last message in the history is newer than its entry.

        The runs to copy are found first (a scan of the last message of every
        run, checked batch by batch as it arrives; nats-py when the reader
        cannot scan, or stops midway), then copied. Found by run, the last
        look winning: a scan that failed midway and the nats-py read after it
        find each run once.
        """
        state = (await self._jsm.stream_info(self._stream)).state
        if not state.messages:
            return 0
        behind: dict[tuple[str, int], int] = {}  # run -> sequence of its last message in the history
        latest, run_key = self._latest, _run_key

        def check(subject: str, seq: int) -> None:
            key = run_key(*subject.rsplit(".", 2)[-2:])
            if key is None:
                return
            if latest.get(key, (0, 0))[0] < seq:
                behind[key] = seq
            elif behind:
                behind.pop(key, None)  # caught up since an earlier look (a scan that failed midway)

        def check_batch(batch: list[Scanned]) -> None:
            for subject, seq, _ in batch:
                check(subject, seq)

        if not await self._scan(self._stream, api.DeliverPolicy.LAST_PER_SUBJECT, check_batch):
            await self._consume(
                self._stream,
                api.DeliverPolicy.LAST_PER_SUBJECT,
                lambda msg: check(msg.subject, _position(msg)[0]),
                headers_only=True,
            )

        async def repair(key: tuple[str, int], seq: int) -> bool:
            raw = await self._jsm.get_msg(self._stream, seq)
            update = self._decode(raw.data or b"", seq)
            if update is None:
                return False
            await self._write_latest(key, self._subjects(*key)[1], update, self._latest.get(key, (0, 0))[1])
            return True

        repaired = 0
        runs = iter(behind.items())
        while some := list(itertools.islice(runs, 64)):  # 64 at a time: an upgrade copies every run
            repaired += sum(await asyncio.gather(*(repair(key, seq) for key, seq in some)))
        return repaired

    # --- writing -----------------------------------------------------------------

    async def _publish_one(
        self, source: str, run: _pb.ProtectionShellInfo, job: _job_pb.ProtectionJob | None
    ) -> PublishOutcome | RunRejected:
        subject, latest_subject = self._subjects(source, run.job_run_id)
        # Publishes of one run through this replica take turns, so that only
        # other replicas can make the optimistic write of a run fail.
        lock = self._locks.setdefault(subject, asyncio.Lock())
        self._lock_users[subject] = self._lock_users.get(subject, 0) + 1
        try:
            async with lock:
                outcome = await self._publish_locked((source, run.job_run_id), subject, latest_subject, run, job)
        finally:
            self._lock_users[subject] -= 1
            if not self._lock_users[subject]:
                del self._lock_users[subject], self._locks[subject]
        if isinstance(outcome, PublishOutcome) and outcome.changed:
            # outside the lock: a slow feed delays only this call; if NATS is slow, it is stored all the same
            await self._history_feed.reach(outcome.update.revision, self._timeout)
        return outcome

    def _new_runs_known(self) -> bool:
        """Whether a key missing from the index means a new run, so that its first publish needs no read.

        The key feed must be live (its last message had nothing pending, and
        the connection has not dropped since), and the history must keep a
        message far longer than that feed lags (milliseconds): a run that
        another replica created a moment ago is then still in the history,
        and JetStream refuses a write that expects it not to be (then the
        publish reads the run, as always).
        """
        return self._keys_live and self._history_keeps_long

    async def _publish_locked(
        self,
        key: tuple[str, int],
        subject: str,
        latest_subject: str,
        run: _pb.ProtectionShellInfo,
        job: _job_pb.ProtectionJob | None,
    ) -> PublishOutcome | RunRejected:
        payload_run = run.SerializeToString(deterministic=True)
        # What this replica knows without asking: the run's latest update as it
        # remembers it, or that the run is new (not in the bucket's key index).
        guess: tuple[int, _svc.RunUpdate | None] | None = None
        remembered = self._remembered.get(subject)
        if remembered is not None:
            guess = (remembered.revision, remembered)
        elif key not in self._latest and self._new_runs_known():
            guess = (0, None)
        fresh = guess is None
        conflicts = 0
        while True:
            if fresh or guess is None:
                expected, current, bucket_seq = await self._read_run(key, subject, latest_subject)
            else:
                (expected, current), bucket_seq = guess, self._latest.get(key, (0, 0))[1]
            outcome = decide(current, run, job, max_bytes=self.max_update_bytes)
            if outcome is not None:
                if fresh:
                    return outcome
                fresh = True  # only a write is checked by JetStream: decide anything else on a fresh read
                continue
            # The job travels inside the stored RunUpdate, as the run does.
            update = new_update(key[0], _pb.ProtectionShellInfo(), job, current, accepted_time_usecs=now_usecs())
            update.run.MergeFromString(payload_run)
            headers = {_EXPECTED_LAST_SUBJECT_SEQ: str(expected)}
            try:
                ack = await self._js.publish(subject, update.SerializeToString(), stream=self._stream, headers=headers)
            except nats.js.errors.APIError as exc:
                if exc.err_code != _WRONG_LAST_SEQUENCE:
                    raise
                if fresh:  # another replica wrote this run: decide again on its new state
                    conflicts += 1
                    if conflicts >= self._max_attempts:
                        break
                    await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2**conflicts)))  # noqa: S311 - jitter
                fresh = True
                continue
            update.revision = ack.seq
            self._remember(subject, update)
            if self._pause_on is not None and run.error == self._pause_on:
                _log.warning("test hook %s: stopped between the two writes of revision %d", PAUSE_HOOK_ENV, ack.seq)
                await asyncio.Event().wait()
            await self._write_latest(key, latest_subject, update, bucket_seq)
            return PublishOutcome(update, changed=True)
        raise StoreUnavailable(
            f"NATS store: run {run.job_run_id} of source {key[0]!r} kept changing under "
            f"{self._max_attempts} attempts; try again"
        )

    async def record_batch(self, items: Sequence[Item]) -> list[PublishOutcome | RunRejected]:
        """Apply updates: different runs concurrently, updates of one run in order.

        Outcomes come back in request order, but the revisions of different
        runs within one batch may not follow it (each run's do).
        """
        by_run: dict[tuple[str, int], list[int]] = {}
        for index, (source, run, _job) in enumerate(items):
            by_run.setdefault((source, run.job_run_id), []).append(index)
        outcomes: list[PublishOutcome | RunRejected | None] = [None] * len(items)

        async def run_in_order(indexes: list[int]) -> None:
            for index in indexes:
                outcomes[index] = await self._publish_one(*items[index])

        try:
            await asyncio.gather(*(run_in_order(indexes) for indexes in by_run.values()))
        except _UNREACHABLE as exc:
            raise self._unavailable("publish failed", exc) from None
        assert all(outcome is not None for outcome in outcomes)
        return outcomes  # type: ignore[return-value]

    # --- reading -----------------------------------------------------------------

    async def get(self, source: str, job_run_id: int) -> _svc.RunUpdate | None:
        """The run's entry in the bucket of latest states."""
        try:
            return (await self._latest_entry(self._subjects(source, job_run_id)[1]))[1]
        except _UNREACHABLE as exc:
            raise self._unavailable("cannot read the run", exc) from None

    async def _consume(
        self, stream: str, deliver: api.DeliverPolicy, handle: Callable[[Any], None], *, headers_only: bool = False
    ) -> None:
        """Hand every message an ephemeral ordered consumer delivers to ``handle``, until none is pending.

        The caller checked that the stream has messages.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        seen = 0

        async def on_message(msg: Any) -> None:
            nonlocal seen
            if done.done():
                return
            seen += 1
            handle(msg)
            if _position(msg)[1] == 0:
                done.set_result(None)

        subject = f"{self._prefix}.>" if stream == self._stream else f"{self._latest_prefix}.>"
        sub = await self._js.subscribe(
            subject,
            stream=stream,
            ordered_consumer=True,
            deliver_policy=deliver,
            headers_only=headers_only,
            cb=on_message,
        )
        try:
            while True:  # bounded by progress: no message for a timeout ends the read
                before = seen
                try:
                    await asyncio.wait_for(asyncio.shield(done), timeout=self._timeout)
                    break
                except TimeoutError:
                    if seen == before:
                        raise
        finally:
            with contextlib.suppress(*_UNREACHABLE):
                await sub.unsubscribe()

    async def _oldest(self) -> tuple[int, int]:
        """The oldest revision the history keeps, and its newest one.

        With an age limit, messages older than it count as gone even before
        JetStream's expiry timer removes them, as in the other stores.
        """
        state = (await self._jsm.stream_info(self._stream)).state
        oldest = state.first_seq if state.messages else state.last_seq + 1
        max_age = self._retention.max_age_seconds
        if max_age and state.messages:
            oldest = max(oldest, await self._first_since(time.time() - max_age, state.last_seq))
        return oldest, state.last_seq

    async def _first_since(self, cutoff: float, last: int) -> int:
        """The sequence of the first message stored at or after ``cutoff`` (Unix seconds)."""
        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(cutoff)) + f".{int(cutoff % 1 * 1e9):09d}Z"
        request = json.dumps({"start_time": start}).encode()
        reply = await self._nc.request(f"$JS.API.DIRECT.GET.{self._stream}", request, timeout=self._timeout)
        seq = (reply.headers or {}).get("Nats-Sequence")
        return int(seq) if seq else last + 1

    async def _pull(self, start: int, count: int) -> list[tuple[int, bytes]]:
        """Up to ``count`` ``(sequence, stored bytes)`` of the history from ``start`` on, in one pull.

        An ephemeral pull consumer (no acks, in memory) delivers them in one
        batch on an inbox of this call: one message costs nats-py only its
        stored header line (a direct get adds six), and the sequence is read
        from the reply subject.
        """
        consumer = await self._reading_consumer(start, max(10.0, 2 * self._timeout))
        messages: list[tuple[int, bytes]] = []
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_message(msg: Any) -> None:
            if msg.reply:
                messages.append((_position(msg)[0], msg.data))
                if len(messages) >= count and not done.done():
                    done.set_result(None)
            elif not done.done():
                done.set_result(None)  # a status: 404 no (more) messages, 408 request expired

        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox, cb=on_message)
        try:
            request = {"batch": count, "no_wait": True, "max_bytes": _BATCH_BYTES}
            await self._nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{consumer}", json.dumps(request).encode(), reply=inbox
            )
            await asyncio.wait_for(done, timeout=self._timeout)
        finally:
            with contextlib.suppress(*_UNREACHABLE):
                await sub.unsubscribe()
            with contextlib.suppress(*_UNREACHABLE, nats.js.errors.Error):
                await self._jsm.delete_consumer(self._stream, consumer)
        return messages

    async def _cursor_consumer(self, start: int) -> str:
        """A pull consumer for the history reader (see :meth:`_reading_consumer`).

        The reader deletes it when it is done with it; the inactivity
        threshold removes it if that delete is lost.
        """
        return await self._reading_consumer(start, max(30.0, 4 * self._timeout))

    async def _reading_consumer(self, start: int, inactive_seconds: float) -> str:
        """A pull consumer of the history from ``start`` on: no acks, in memory, one replica."""
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=f"{self._prefix}.>",
            inactive_threshold=inactive_seconds,
            mem_storage=True,
            num_replicas=1,
        )
        return str((await self._jsm.add_consumer(self._stream, config)).name)

    def _say_reader(self, why: str) -> None:
        if not self._reader_said:
            self._reader_said = True
            _log.debug("stream %s: catch-up reads JetStream through nats-py (%s; said once)", self._stream, why)

    async def _history_wire(self, start: int, end: int, limit: int) -> list[tuple[int, bytes]]:
        """``(revision, RunUpdate bytes)`` of the history in ``[start, end]``, at most ``limit``.

        From the in-memory window when it covers the range, else from
        JetStream: through the history reader, or through nats-py when the
        reader cannot serve this read (then the whole read is done again).

        The oldest revision is checked first (a round trip), except on a
        call that continues a reader's cursor when the history has no age
        limit: the previous call checked its start, and what retention
        removed since is a gap in what the consumer delivers, which
        :meth:`_read_history` checks. (An update older than the age limit
        counts as gone before JetStream removes it: no gap shows that.)
        """
        if limit <= 0:
            return []
        reader = self._reader
        url = self._nc.connected_url if self._nc is not None else None
        usable = reader is not None and url is not None and not reader.paused
        continues = usable and reader is not None and reader.continues(start)
        if not (continues and not self._retention.max_age_seconds):
            oldest, last = await self._oldest()
            if start < oldest:
                raise HistoryExpired(start, oldest)
            end = min(end, last)
            if start > end:
                return []
            if start >= self._window.low and end <= self._history_feed.position:
                return self._window.read(start, end, limit)
        *through_reader, pull = self._fetches(end)
        for read in through_reader:
            try:
                return await self._read_history(start, end, limit, read, reader.discard if reader else None)
            except ReaderUnavailable as exc:
                if reader is not None:
                    reader.failed(exc)
                self._say_reader(str(exc))
        return await self._read_history(start, end, limit, pull)

    def _fetches(self, end: int) -> list[Callable[[int, int], Awaitable[Chunk]]]:
        """How to read the history up to ``end``: ``fetch(position, at most)``, through the reader, then nats-py."""
        fetches: list[Callable[[int, int], Awaitable[Chunk]]] = []
        reader = self._reader
        url = self._nc.connected_url if self._nc is not None else None
        if reader is not None and url is not None and not reader.paused:

            async def read(position: int, count: int) -> Chunk:
                return await reader.read(url, position, end, count)

            fetches.append(read)

        async def pull(position: int, count: int) -> Chunk:
            messages = await self._pull(position, min(_BATCH, count, end - position + 1))
            chunk = _chunk(position, [m for m in messages if m[0] <= end])
            if messages and messages[-1][0] > end and chunk.next <= end:
                # Past `end` (as the reader's cursor): the range is done, what was skipped up to it a gap.
                chunk = chunk._replace(gaps=[*chunk.gaps, chunk.next], next=end + 1)
            return chunk

        fetches.append(pull)
        return fetches

    async def _read_history(
        self,
        start: int,
        end: int,
        limit: int,
        fetch: Callable[[int, int], Awaitable[Chunk]],
        discard: Callable[[int], None] | None = None,
    ) -> list[tuple[int, bytes]]:
        """What :meth:`_history_wire` returns, from ``fetch(position, at most)`` calls.

        A message that is not a RunUpdate is skipped, loudly. A sequence
        missing from what JetStream returned is checked: if retention (or an
        age expiry) trimmed it after the oldest revision was checked, the
        read fails with :class:`HistoryExpired` rather than skip updates
        silently. When JetStream returns nothing, the oldest and newest
        revisions are checked again: a trimmed or shortened history is not
        waited for, nor a stretch up to ``end`` whose messages were all
        deleted (the stream's leader is asked for the next message).
        ``discard(next)`` is called when a gap was trimmed: the reader drops
        the cursor it keeps for ``next``, whose read-ahead may be stale.
        """
        out: list[tuple[int, bytes]] = []
        position = start
        empty = 0
        while position <= end and len(out) < limit:
            chunk = await fetch(position, limit - len(out))
            try:
                for missing in chunk.gaps:
                    await self._check_gap(missing)
            except HistoryExpired:
                if discard is not None:
                    discard(chunk.next)
                raise
            for seq in chunk.foreign:
                _log.warning("stream %s: message %d is not a RunUpdate; skipped", self._stream, seq)
            if chunk.next <= position:
                oldest, last = await self._oldest()
                if position < oldest:
                    raise HistoryExpired(position, oldest)
                end = min(end, last)
                if position > end or await self._none_in(position, end):
                    break
                # Never report a gap as the end: JetStream said it has up to `end`.
                empty += 1
                if empty * 0.05 > self._timeout:
                    raise StoreUnavailable(f"NATS store: stream {self._stream} did not return revision {position}")
                await asyncio.sleep(0.05)
                continue
            out += chunk.records
            position = chunk.next
        return out

    async def _none_in(self, start: int, end: int) -> bool:
        """Whether the history holds no message in ``[start, end]`` (``start`` not below the oldest: they were deleted).

        Asked of the stream's leader (not a direct get, which a lagging replica may answer).
        """
        try:
            msg = await self._jsm.get_msg(self._stream, seq=start, subject=f"{self._prefix}.>", next=True)
        except nats.js.errors.NotFoundError:
            return True
        return int(msg.seq) > end

    async def _check_gap(self, missing: int) -> None:
        """Sequence ``missing`` was not delivered: fine if it was deleted, HistoryExpired if trimmed."""
        oldest, _ = await self._oldest()
        if oldest > missing:
            raise HistoryExpired(missing, oldest)

    async def history(self, start_revision: int, end_revision: int, limit: int) -> list[_svc.RunUpdate]:
        """Messages with sequence in ``[start_revision, end_revision]``, from the stream."""
        try:
            wire = await self._history_wire(start_revision, end_revision, limit)
        except _UNREACHABLE as exc:
            raise self._unavailable("cannot read the history", exc) from None
        return [_svc.RunUpdate.FromString(data) for _, data in wire]

    async def history_wire(self, start_revision: int, end_revision: int, limit: int) -> list[tuple[int, bytes]]:
        """As :meth:`history`, as the stored bytes with the revision appended: nothing is re-encoded."""
        try:
            return await self._history_wire(start_revision, end_revision, limit)
        except _UNREACHABLE as exc:
            raise self._unavailable("cannot read the history", exc) from None

    async def snapshot(self, flt: _svc.RunFilter | None) -> tuple[list[_svc.RunUpdate], int]:
        """The latest update of every run, in revision order, and the head they are consistent with.

        The bucket has every run; the history's last message per subject is
        read as well, and the newer of the two taken, so that an update whose
        bucket write is still on its way (or was lost with its writer) is in
        the snapshot that a watch from the returned head continues.
        """
        latest: dict[tuple[str, int], _svc.RunUpdate] = {}

        def keep(update: _svc.RunUpdate | None) -> None:
            if update is None:
                return
            key = (update.source, update.run.job_run_id)
            known = latest.get(key)
            if known is None or known.revision < update.revision:
                latest[key] = update

        def from_bucket(msg: Any) -> None:
            with contextlib.suppress(Exception):
                keep(_svc.RunUpdate.FromString(msg.data))

        def from_history(msg: Any) -> None:
            keep(self._decode(msg.data, _position(msg)[0]))

        try:
            state = (await self._jsm.stream_info(self._stream)).state
            if (await self._jsm.stream_info(self._latest_stream)).state.messages:
                await self._consume(self._latest_stream, api.DeliverPolicy.ALL, from_bucket)
            if state.messages:
                await self._consume(self._stream, api.DeliverPolicy.LAST_PER_SUBJECT, from_history)
        except _UNREACHABLE as exc:
            raise self._unavailable("cannot read the runs", exc) from None
        head = max(max((u.revision for u in latest.values()), default=0), state.last_seq)
        matches = compile_filter(flt)
        return sorted((u for u in latest.values() if matches(u)), key=lambda u: u.revision), head

    async def list_runs(
        self, flt: _svc.RunFilter | None, after: tuple[str, int] | None, limit: int
    ) -> list[_svc.RunUpdate]:
        """Latest states ordered by (source, job_run_id): one page of the key index, and those entries.

        The index is first brought up to the bucket's last sequence, so a run
        another replica created before this call is listed.
        """
        if limit <= 0:
            return []
        matches = compile_filter(flt)
        out: list[_svc.RunUpdate] = []
        try:
            last = (await self._jsm.stream_info(self._latest_stream)).state.last_seq
            await self._latest_feed.reach(last, self._timeout)
            position = after
            while len(out) < limit:
                index = 0 if position is None else bisect.bisect_right(self._keys, position)
                page = self._keys[index : index + limit - len(out)]
                if not page:
                    break
                position = page[-1]
                entries = await asyncio.gather(*(self._latest_entry(self._subjects(*key)[1]) for key in page))
                out.extend(u for _, u in entries if u is not None and matches(u))
        except _UNREACHABLE as exc:
            raise self._unavailable("cannot read the runs", exc) from None
        return out

    def head_revision(self) -> int:
        """The newest sequence this replica has followed (and told its listeners about)."""
        return self._history_feed.position


def _tls_context(options: Mapping[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("tls_ca"))
    cert, key = options.get("tls_cert"), options.get("tls_key")
    if bool(cert) != bool(key):
        raise ConfigurationError("NATS store: give both tls_cert and tls_key, or neither")
    if cert and key:
        try:
            context.load_cert_chain(cert, key)
        except OSError as exc:
            raise ConfigurationError(f"NATS store: cannot read {exc.filename}: {exc.strerror}") from None
    return context
