"""Fan-out: committed updates go to every watcher, and watch responses are encoded once.

The :class:`Hub` listens to the store and offers each commit to every
:class:`_Watcher`, a queue per WatchRuns call bounded in updates and in bytes
that never makes a publisher wait: a watcher that falls too far behind is
marked ``overflow`` and its queue dropped. :meth:`Hub.watch` is one WatchRuns
call's stream: the snapshot or the stored history first, then what the
watcher's queue receives; it ends with an error that says where to resume
when the watcher overflows or the hub closes.

Live fan-out is the hot path (1,000 watchers at 50 commits/s are 50,000
deliveries a second), so per commit the work is done once per filter shape
(watchers whose filters serialize alike): select the matching updates, build
the response bytes. Per watcher there is only a deque append, two counters
and, if its watch waits, completing one future. Responses waiting together
are joined into one (concatenated WatchRunsResponse encodings are one
response: repeated fields append, the last revision wins). Progress while
idle comes from one hub timer, not from a timeout per watch and wait.

A WatchRunsResponse is `repeated RunUpdate updates = 1; int64 revision = 2;
bool snapshot_complete = 3`. Building it as a message makes upb copy every
update into the repeated field, and sizing batches needs ByteSize() per
update: together most of the cost of a catch-up. Instead each update is
serialized once (once per commit for live updates, whatever the number of
watchers) and responses are concatenated from those bytes, which is the
same wire format. The service is registered with a serializer that passes
bytes through (:func:`serialize_response`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

from google.protobuf.message import Message

from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc
from shellinfo_grpc._status import KEY_LAST_REVISION, REASON_SERVER_SHUTTING_DOWN, REASON_WATCHER_TOO_SLOW
from shellinfo_grpc.errors import ServiceError
from shellinfo_grpc.framing import encode_varint
from shellinfo_grpc.rules import compile_filter
from shellinfo_grpc.stores import Store

__all__ = [
    "Hub",
    "batches",
    "encode",
    "serialize_response",
]

#: One update and its serialized form.
_Encoded = tuple[_svc.RunUpdate, bytes]

#: One ready response of a live watch: its bytes, how many updates it holds, the revision of
#: the first, the revision it reports. Only the bytes are kept: a queue's memory is its bytes.
_Chunk = tuple[bytes, int, int, int]

_UPDATES_TAG: Final = b"\x0a"  # field 1, length-delimited
_REVISION_TAG: Final = b"\x10"  # field 2, varint
_SNAPSHOT_COMPLETE: Final = b"\x18\x01"  # field 3 = true
_SHORT_LENGTHS: Final = tuple(encode_varint(n) for n in range(1 << 14))


# Anything sent as one update of a response: its serialized form comes second.
_Item = TypeVar("_Item", bound=tuple[Any, bytes])


def _has_filter(flt: _svc.RunFilter | None) -> bool:
    """Whether ``flt`` leaves any update out (an unfiltered watch sends stored bytes as they are)."""
    return flt is not None and bool(flt.sources or flt.job_run_ids or flt.statuses or flt.run_types or flt.job_ids)


def encode(updates: Iterable[_svc.RunUpdate]) -> list[_Encoded]:
    """Each update with its serialized form."""
    return [(update, update.SerializeToString()) for update in updates]


def _watch_response(batch: Sequence[tuple[Any, bytes]], revision: int, *, snapshot_complete: bool = False) -> bytes:
    """The wire form of ``WatchRunsResponse(updates=..., revision=..., snapshot_complete=...)``."""
    parts: list[bytes] = []
    short = _SHORT_LENGTHS
    for _, data in batch:
        size = len(data)
        parts += (_UPDATES_TAG, short[size] if size < len(short) else encode_varint(size), data)
    if revision:
        parts += (_REVISION_TAG, encode_varint(revision))
    if snapshot_complete:
        parts.append(_SNAPSHOT_COMPLETE)
    return b"".join(parts)


def serialize_response(response: bytes | Message) -> bytes:
    """The response serializer of the service: pre-encoded bytes pass through, messages are serialized."""
    return response if type(response) is bytes else response.SerializeToString()  # type: ignore[union-attr]


def batches(items: Iterable[_Item], max_updates: int, max_bytes: int) -> Iterable[list[_Item]]:
    """Split updates into responses of at most ``max_updates`` updates and about ``max_bytes`` bytes."""
    batch: list[_Item] = []
    size = 0
    for item in items:
        n = len(item[1])
        if batch and (len(batch) >= max_updates or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch


class _Watcher:
    """The live side of one WatchRuns call: a queue of ready responses, bounded in updates and bytes.

    The hub appends to ``pending`` one chunk per commit (or per batch of a
    large commit): the response bytes, built once for every watcher of the
    same filter shape, the updates in it and the revision it reports.
    ``waiter`` is the future the watch waits on while its queue is empty;
    whoever puts work in the queue completes it. ``beat`` is the hub's tick
    at the watcher's last response, for progress while idle. A ``held`` watch is
    paced (see :data:`SEND_BUDGET`): new chunks join its queue without waking
    it, and its slot's timer wakes it.
    """

    __slots__ = (
        "beat",
        "closing",
        "due",
        "every",
        "held",
        "max_bytes",
        "max_queue",
        "overflow",
        "pending",
        "queued",
        "queued_bytes",
        "sent_at",
        "waiter",
    )

    def __init__(self, max_queue: int, max_bytes: int, every: int, beat: int) -> None:
        self.max_queue = max_queue
        self.max_bytes = max_bytes
        self.pending: deque[_Chunk] = deque()
        self.queued = 0  # updates in pending
        self.queued_bytes = 0  # response bytes in pending
        self.waiter: asyncio.Future[None] | None = None
        self.overflow = False
        self.closing = False
        self.every = every  # ticks between progress responses while idle
        self.beat = beat
        self.due = False  # a progress response is due
        self.held = False  # paced: waiting for its slot's timer, whatever arrives meanwhile
        self.sent_at = 0.0  # loop time of its last live response

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():  # a cancelled watch unregisters a moment later
                waiter.set_result(None)

    def close(self) -> None:
        self.closing = True
        self.wake()


class _Shape:
    """The watchers of one filter shape: matching and encoding happen once for all of them."""

    __slots__ = ("key", "matches", "watchers")

    def __init__(self, key: bytes, matches: Callable[[_svc.RunUpdate], bool] | None) -> None:
        self.key = key  # the filter, serialized deterministically; b"" for none
        self.matches = matches  # None: every update
        self.watchers: dict[_Watcher, None] = {}


#: Seconds between the hub's progress ticks (the finest progress interval a watch gets).
TICK: Final = 0.05

#: Responses a second that the hub lets all live watches send together before it paces them.
#: One response costs grpc.aio about 20-40 us of CPU whatever it holds, so past this budget a
#: watch sends at most one response per ``len(watchers) / SEND_BUDGET`` seconds, with what
#: arrived meanwhile joined into it: 1,000 watches send each at most every 100 ms, 100 watches
#: every 10 ms. An update that finds its watch idle for longer goes out at once, so pacing adds
#: latency only to a watch that is already sending that often.
SEND_BUDGET: Final = 10_000
#: The longest a paced watch waits (s) between two responses, however many watches there are.
MAX_PACE: Final = 0.1
#: Under this pace (s), i.e. under 50 watches, nothing is paced: with few watches grpc.aio's cost
#: per response was measured to matter less than the up-to-one-pace of latency pacing adds.
MIN_PACE: Final = 0.005
#: Paced watches are released by one timer per slot of a quarter of the pace, not one per watch.
PACE_SLOTS: Final = 4


class Hub:
    """Fans committed updates out to every watcher; never waits on one.

    Per commit, each filter shape's matching updates are selected and their
    response bytes built once; a watcher's share of the work is appending
    that chunk to its queue and waking its watch if it waits. Progress while
    idle comes from one timer for all watches, not a timeout per watch.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_queue: int,
        max_batch_updates: int,
        max_batch_bytes: int,
        max_queue_bytes: int = 64 << 20,
        send_budget: float = SEND_BUDGET,
        max_pace: float = MAX_PACE,
    ) -> None:
        self._max_queue = max_queue
        self._max_queue_bytes = max_queue_bytes
        self._max_updates = max_batch_updates
        self._max_bytes = max_batch_bytes
        self.revision = store.head_revision()
        self._shapes: dict[bytes, _Shape] = {}
        self.watchers: dict[_Watcher, _Shape] = {}
        self.closed = False
        self._ticks = 0
        self._timer: asyncio.TimerHandle | None = None
        self._send_budget = send_budget
        self._max_pace = max_pace
        self.pace = 0.0  # seconds a live watch leaves between two responses (0: none)
        # Paced watches by the loop time that releases them (one timer per slot).
        self._slots: dict[float, list[_Watcher]] = {}
        self._store = store
        store.add_listener(self._on_commit)

    def _on_commit(self, updates: Sequence[_svc.RunUpdate]) -> None:
        last = updates[-1].revision
        self.revision = last
        if not self._shapes:
            return
        encoded = encode(updates)  # once per commit, whatever the number of watchers
        for shape in self._shapes.values():
            matches = shape.matches
            items = encoded if matches is None else [item for item in encoded if matches(item[0])]
            if items:
                self._deliver(shape, self._chunks(items, last))

    def _chunks(self, items: list[_Encoded], last: int) -> list[_Chunk]:
        """The responses of one commit for one filter shape: at most a batch each; the last reports ``last``."""
        if len(items) <= self._max_updates and sum(len(data) for _, data in items) <= self._max_bytes:
            return [(_watch_response(items, last), len(items), items[0][0].revision, last)]
        split = list(batches(items, self._max_updates, self._max_bytes))
        out: list[_Chunk] = []
        for k, batch in enumerate(split):
            reported = last if k == len(split) - 1 else batch[-1][0].revision
            out.append((_watch_response(batch, reported), len(batch), batch[0][0].revision, reported))
        return out

    def _deliver(self, shape: _Shape, chunks: list[_Chunk]) -> None:
        """Queue ``chunks`` for every watcher of ``shape``: the only work per watcher per commit.

        The bounds apply to what earlier commits left unsent: a watcher that
        still has ``max_queue`` updates or ``max_queue_bytes`` bytes waiting
        when the next commit arrives cannot keep up; its queue is dropped and
        it is ended (it resumes from its last revision). A single large commit
        never overflows a watcher that is keeping up.
        """
        count = sum(chunk[1] for chunk in chunks)
        size = sum(len(chunk[0]) for chunk in chunks)
        one = chunks[0] if len(chunks) == 1 else None
        full_n, full_bytes = self._max_updates, self._max_bytes  # a paced watch with a full response goes now
        for watcher in shape.watchers:
            if watcher.overflow:
                continue
            if watcher.queued >= watcher.max_queue or watcher.queued_bytes >= watcher.max_bytes:
                watcher.overflow = True
                watcher.pending.clear()
                watcher.queued = watcher.queued_bytes = 0
                watcher.wake()
                continue
            if one is not None:
                watcher.pending.append(one)
            else:
                watcher.pending.extend(chunks)
            watcher.queued += count
            watcher.queued_bytes += size
            waiter = watcher.waiter
            if waiter is not None and (
                not watcher.held or watcher.queued >= full_n or watcher.queued_bytes >= full_bytes
            ):
                watcher.waiter = None
                if not waiter.done():
                    waiter.set_result(None)

    def register(self, flt: _svc.RunFilter | None, progress: float = 5.0) -> _Watcher:
        """A new watcher of ``flt`` that gets every commit from now on."""
        key = flt.SerializeToString(deterministic=True) if flt is not None and _has_filter(flt) else b""
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = _Shape(key, compile_filter(flt) if key else None)
        every = max(1, round(progress / TICK))
        watcher = _Watcher(self._max_queue, self._max_queue_bytes, every, self._ticks)
        if self.closed:
            watcher.close()
        shape.watchers[watcher] = None
        self.watchers[watcher] = shape
        self._set_pace()
        if self._timer is None and not self.closed:
            self._timer = asyncio.get_running_loop().call_later(TICK, self._tick)
        return watcher

    def unregister(self, watcher: _Watcher) -> None:
        shape = self.watchers.pop(watcher, None)
        if shape is None:
            return
        del shape.watchers[watcher]
        if not shape.watchers:
            del self._shapes[shape.key]
        self._set_pace()

    def _set_pace(self) -> None:
        pace = min(self._max_pace, len(self.watchers) / self._send_budget)
        self.pace = pace if pace >= MIN_PACE else 0.0

    def hold(self, watcher: _Watcher, until: float) -> None:
        """Pace ``watcher``: its watch waits until loop time ``until``, rounded up to a slot."""
        watcher.held = True
        length = self.pace / PACE_SLOTS
        slot = -(-until // length) * length
        waiting = self._slots.get(slot)
        if waiting is None:
            self._slots[slot] = [watcher]
            asyncio.get_running_loop().call_at(slot, self._release, slot)
        else:
            waiting.append(watcher)

    def _release(self, slot: float) -> None:
        for watcher in self._slots.pop(slot, ()):
            watcher.wake()

    def _tick(self) -> None:
        """Wake the idle watches whose progress response is due; one timer for all."""
        self._ticks = ticks = self._ticks + 1
        for watcher in self.watchers:
            if watcher.waiter is None or watcher.held:
                continue
            if ticks - watcher.beat >= watcher.every:
                watcher.due = True
                watcher.wake()
        self._timer = None
        if self.watchers and not self.closed:
            self._timer = asyncio.get_running_loop().call_later(TICK, self._tick)

    def close(self) -> None:
        self.closed = True
        self._store.remove_listener(self._on_commit)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for watcher in self.watchers:
            watcher.close()
        for slot in list(self._slots):
            self._release(slot)

    async def watch(
        self, flt: _svc.RunFilter | None, start_revision: int, include_snapshot: bool, progress: float
    ) -> AsyncIterator[bytes | _svc.WatchRunsResponse]:
        """The responses of one WatchRuns call: snapshot or history first, then live.

        ``progress`` is the seconds between progress responses while idle.
        Ends by raising a :class:`~shellinfo_grpc.errors.ServiceError`: the
        store's (unavailable, history expired), or the hub's when it closes
        (UNAVAILABLE) or the watcher falls too far behind (RESOURCE_EXHAUSTED),
        each with the last revision sent.
        """
        watcher = self.register(flt, progress)
        sent = registered = self.revision  # every matching update up to here has been sent
        try:
            if include_snapshot:
                updates, head = await self._store.snapshot(flt)
                complete = True
                for batch in batches(encode(updates), self._max_updates, self._max_bytes):
                    sent = batch[-1][0].revision
                    yield _watch_response(batch, sent)
                    if watcher.closing or watcher.overflow:
                        complete = False  # _live ends the watch with the right error
                        break
                if complete:
                    sent = max(head, sent)
                    yield _svc.WatchRunsResponse(snapshot_complete=True, revision=sent)
            elif start_revision:
                sent = start_revision - 1
                matches = None if not _has_filter(flt) else compile_filter(flt)
                history = self._catch_up(start_revision, registered, watcher, matches)
                async for response, revision in history:
                    sent = revision
                    yield response
            else:
                # A watch "from now" says at once where now is, so that a
                # client that loses the connection knows where to resume.
                yield _svc.WatchRunsResponse(revision=sent)
            async for live in self._live(watcher, sent):
                yield live
        finally:
            self.unregister(watcher)

    async def _catch_up(
        self,
        start: int,
        end: int,
        watcher: _Watcher,
        matches: Callable[[_svc.RunUpdate], bool] | None,
    ) -> AsyncIterator[tuple[bytes, int]]:
        """Send the stored history from ``start`` up to ``end``, where the live queue begins."""
        position = start
        last = start - 1
        read = 4 * self._max_updates
        while position <= end:
            if matches is None:  # the stored bytes go out as they are
                chunk = await self._store.history_wire(position, end, read)
                if not chunk:
                    break
                position = chunk[-1][0] + 1
            else:
                updates = await self._store.history(position, end, read)
                if not updates:
                    break
                position = updates[-1].revision + 1
                chunk = [(u.revision, data) for u, data in encode(u for u in updates if matches(u))]
            for batch in batches(chunk, self._max_updates, self._max_bytes):
                last = batch[-1][0]
                yield _watch_response(batch, last), last
            if watcher.overflow or watcher.closing:
                return  # _live ends the watch with the right error
        # Everything matching up to `end` has been sent. Say so in a response
        # of its own (it carries no updates): a filtered watcher's resume point
        # moves past the updates it skipped, and a client completing a broken
        # snapshot from the history knows it has caught up.
        yield _watch_response((), max(end, last)), max(end, last)

    async def _live(self, watcher: _Watcher, sent: int) -> AsyncIterator[bytes]:
        """Send queued responses as they arrive (what is waiting together); progress while idle."""
        pending = watcher.pending
        loop = asyncio.get_running_loop()
        limit_n, limit_bytes = self._max_updates, self._max_bytes
        while True:
            if watcher.closing:
                raise ServiceError(
                    "UNAVAILABLE",
                    REASON_SERVER_SHUTTING_DOWN,
                    "the server is shutting down; resume the watch elsewhere",
                    metadata={KEY_LAST_REVISION: str(sent)},
                )
            if watcher.overflow:
                raise ServiceError(
                    "RESOURCE_EXHAUSTED",
                    REASON_WATCHER_TOO_SLOW,
                    f"watcher fell more than {watcher.max_queue} updates or {watcher.max_bytes} bytes behind;"
                    f" resume from revision {sent + 1}",
                    metadata={KEY_LAST_REVISION: str(sent)},
                )
            if pending:
                pace = self.pace
                if pace and not watcher.held and watcher.queued < limit_n and watcher.queued_bytes < limit_bytes:
                    until = watcher.sent_at + pace
                    if loop.time() < until:
                        # Sent a moment ago: what arrives until its slot goes in one response
                        # (a full response never waits, so pacing never slows a busy watch).
                        self.hold(watcher, until)
                        waiter = loop.create_future()
                        watcher.waiter = waiter
                        await waiter
                        continue
                watcher.held = False
                data, n, first, last = pending.popleft()
                watcher.queued -= n
                watcher.queued_bytes -= len(data)
                if last <= sent:
                    continue  # already sent by the snapshot
                if first <= sent:  # partly sent by the snapshot (rare): keep the rest
                    rest = [u for u in _svc.WatchRunsResponse.FromString(data).updates if u.revision > sent]
                    data = _watch_response(encode(rest), last)
                elif pending:  # more is waiting: send it together, a response of the usual size at most
                    parts, size = [data], len(data)
                    while pending:
                        more, more_n, _, more_last = pending[0]
                        if n + more_n > limit_n or size + len(more) > limit_bytes:
                            break
                        pending.popleft()
                        watcher.queued -= more_n
                        watcher.queued_bytes -= len(more)
                        parts.append(more)  # concatenated responses are one response
                        n += more_n
                        size += len(more)
                        last = more_last
                    data = b"".join(parts)
                sent = last
                watcher.beat = self._ticks
                if self.pace:
                    watcher.sent_at = loop.time()
                yield data
                continue
            if watcher.due:
                watcher.due = False
                watcher.beat = self._ticks
                sent = max(sent, self.revision)
                yield _watch_response((), sent)
                continue
            waiter = loop.create_future()
            watcher.waiter = waiter
            await waiter
