"""Fan-out: committed updates go to every watcher, and watch responses are encoded once.

The :class:`Hub` listens to the store and offers each commit to every
:class:`_Watcher`, a bounded queue per WatchRuns call that never makes a
publisher wait: a watcher that falls too far behind is marked ``overflow``.
:meth:`Hub.watch` is one WatchRuns call's stream: the snapshot or the stored
history first, then what the watcher's queue receives; it ends with an error
that says where to resume when the watcher overflows or the hub closes.

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


def _held(item: _Encoded) -> int:
    """The memory a queued update holds: its message and its encoding, each about the encoded size."""
    return 2 * len(item[1])


class _Watcher:
    """The live side of one WatchRuns call: a bounded queue fed by the hub."""

    __slots__ = (
        "closing",
        "event",
        "matches",
        "max_queue",
        "max_queue_bytes",
        "overflow",
        "pending",
        "pending_bytes",
        "seen",
    )

    def __init__(
        self, matches: Callable[[_svc.RunUpdate], bool], max_queue: int, revision: int, max_queue_bytes: int
    ) -> None:
        self.matches = matches
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.pending: deque[_Encoded] = deque()
        self.pending_bytes = 0  # the memory ``pending`` holds: see _held
        self.event = asyncio.Event()
        self.overflow = False
        self.closing = False
        self.seen = revision  # newest revision the hub has offered (matching or not)

    def offer(self, updates: Sequence[_Encoded]) -> None:
        """Queue the matching updates of one commit; never waits.

        The bounds apply to what earlier commits left unsent: a watcher that
        still has ``max_queue`` updates, or ``max_queue_bytes`` bytes of them,
        waiting when the next commit arrives cannot keep up, and its queue is
        dropped (it resumes from its last revision). So a stalled watcher holds
        at most about ``max_queue_bytes`` plus one commit. A single large
        commit never overflows a watcher that is keeping up.
        """
        self.seen = updates[-1][0].revision
        if self.overflow:
            return
        if len(self.pending) >= self.max_queue or self.pending_bytes >= self.max_queue_bytes:
            self.overflow = True
            self.pending.clear()
            self.pending_bytes = 0
            self.event.set()
            return
        matches = self.matches
        added = [item for item in updates if matches(item[0])]
        if added:
            self.pending.extend(added)
            self.pending_bytes += sum(_held(item) for item in added)
            self.event.set()

    def take(self) -> _Encoded:
        """The oldest queued update, out of the queue."""
        item = self.pending.popleft()
        self.pending_bytes -= _held(item)
        return item

    def close(self) -> None:
        self.closing = True
        self.event.set()


class Hub:
    """Fans committed updates out to every watcher; never waits on one."""

    def __init__(
        self,
        store: Store,
        *,
        max_queue: int,
        max_batch_updates: int,
        max_batch_bytes: int,
        max_queue_bytes: int = 64 << 20,
    ) -> None:
        self._max_queue = max_queue
        self._max_queue_bytes = max_queue_bytes
        self._max_updates = max_batch_updates
        self._max_bytes = max_batch_bytes
        self.revision = store.head_revision()
        self.watchers: set[_Watcher] = set()
        self.closed = False
        self._store = store
        store.add_listener(self._on_commit)

    def _on_commit(self, updates: Sequence[_svc.RunUpdate]) -> None:
        self.revision = updates[-1].revision
        if self.watchers:
            encoded = encode(updates)  # once per commit, whatever the number of watchers
            for watcher in self.watchers:
                watcher.offer(encoded)

    def register(self, matches: Callable[[_svc.RunUpdate], bool]) -> _Watcher:
        watcher = _Watcher(matches, self._max_queue, self.revision, self._max_queue_bytes)
        if self.closed:
            watcher.close()
        self.watchers.add(watcher)
        return watcher

    def unregister(self, watcher: _Watcher) -> None:
        self.watchers.discard(watcher)

    def close(self) -> None:
        self.closed = True
        self._store.remove_listener(self._on_commit)
        for watcher in self.watchers:
            watcher.close()

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
        matches = compile_filter(flt)
        matches = compile_filter(flt)
        watcher = self.register(matches)
        sent = watcher.seen  # every matching update up to here has been sent
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
                history = self._catch_up(start_revision, watcher, not _has_filter(flt))
                async for response, revision in history:
                    sent = revision
                    yield response
            else:
                # A watch "from now" says at once where now is, so that a
                # client that loses the connection knows where to resume.
                yield _svc.WatchRunsResponse(revision=sent)
            async for live in self._live(watcher, sent, progress):
                yield live
        finally:
            self.unregister(watcher)

    async def _catch_up(
        self,
        start: int,
        watcher: _Watcher,
        unfiltered: bool,
    ) -> AsyncIterator[tuple[bytes, int]]:
        """Send the stored history from ``start`` up to where the live queue begins."""
        end = watcher.seen  # the live queue holds everything after this
        position = start
        last = start - 1
        read = 4 * self._max_updates
        while position <= end:
            if unfiltered:  # the stored bytes go out as they are
                chunk = await self._store.history_wire(position, end, read)
                if not chunk:
                    break
                position = chunk[-1][0] + 1
            else:
                updates = await self._store.history(position, end, read)
                if not updates:
                    break
                position = updates[-1].revision + 1
                chunk = [(u.revision, data) for u, data in encode(u for u in updates if watcher.matches(u))]
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

    async def _live(
        self,
        watcher: _Watcher,
        sent: int,
        progress: float,
    ) -> AsyncIterator[bytes | _svc.WatchRunsResponse]:
        """Send queued updates as they arrive; progress while idle."""
        pending = watcher.pending
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
                    f"watcher fell more than {watcher.max_queue} updates or {watcher.max_queue_bytes} bytes behind;"
                    f" resume from revision {sent + 1}",
                    metadata={KEY_LAST_REVISION: str(sent)},
                )
            while pending and pending[0][0].revision <= sent:
                watcher.take()  # already sent by the snapshot or the catch-up
            if pending:
                batch: list[_Encoded] = []
                size = 0
                limit_n, limit_bytes = self._max_updates, self._max_bytes
                while pending and len(batch) < limit_n and (not batch or size + len(pending[0][1]) <= limit_bytes):
                    item = watcher.take()
                    batch.append(item)
                    size += len(item[1])
                last = batch[-1][0].revision
                sent = last if pending else max(last, watcher.seen)
                yield _watch_response(batch, sent)
                continue
            watcher.event.clear()
            try:
                async with asyncio.timeout(progress):  # no task per wait, unlike wait_for
                    await watcher.event.wait()
            except TimeoutError:
                if not pending and not watcher.overflow and not watcher.closing:
                    sent = max(sent, watcher.seen)
                    yield _svc.WatchRunsResponse(revision=sent)
