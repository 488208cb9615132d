"""Fan-out: committed updates go to every watcher, and watch responses are encoded once.

The :class:`Hub` listens to the store and offers each commit to every
:class:`Watcher`, a bounded queue per WatchRuns call that never makes a
publisher wait: a watcher that falls too far behind is marked ``overflow``
and the server ends its call so that it resumes.

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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

from google.protobuf.message import Message

from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc
from shellinfo_grpc.framing import encode_varint
from shellinfo_grpc.stores import Store

__all__ = [
    "Encoded",
    "Hub",
    "Watcher",
    "batches",
    "encode",
    "has_filter",
    "serialize_response",
    "watch_response",
]

#: One update and its serialized form.
Encoded = tuple[_svc.RunUpdate, bytes]

_UPDATES_TAG: Final = b"\x0a"  # field 1, length-delimited
_REVISION_TAG: Final = b"\x10"  # field 2, varint
_SNAPSHOT_COMPLETE: Final = b"\x18\x01"  # field 3 = true
_SHORT_LENGTHS: Final = tuple(encode_varint(n) for n in range(1 << 14))


# Anything sent as one update of a response: its serialized form comes second.
_Item = TypeVar("_Item", bound=tuple[Any, bytes])


def has_filter(flt: _svc.RunFilter | None) -> bool:
    """Whether ``flt`` leaves any update out (an unfiltered watch sends stored bytes as they are)."""
    return flt is not None and bool(flt.sources or flt.job_run_ids or flt.statuses or flt.run_types)


def encode(updates: Iterable[_svc.RunUpdate]) -> list[Encoded]:
    """Each update with its serialized form."""
    return [(update, update.SerializeToString()) for update in updates]


def watch_response(batch: Sequence[tuple[Any, bytes]], revision: int, *, snapshot_complete: bool = False) -> bytes:
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


class Watcher:
    """The live side of one WatchRuns call: a bounded queue fed by the hub."""

    __slots__ = ("closing", "event", "matches", "max_queue", "overflow", "pending", "seen")

    def __init__(self, matches: Callable[[_svc.RunUpdate], bool], max_queue: int, revision: int) -> None:
        self.matches = matches
        self.max_queue = max_queue
        self.pending: deque[Encoded] = deque()
        self.event = asyncio.Event()
        self.overflow = False
        self.closing = False
        self.seen = revision  # newest revision the hub has offered (matching or not)

    def offer(self, updates: Sequence[Encoded]) -> None:
        """Queue the matching updates of one commit; never waits.

        The bound applies to what earlier commits left unsent: a watcher that
        still has ``max_queue`` updates waiting when the next commit arrives
        cannot keep up, and its queue is dropped (it resumes from its last
        revision). A single large commit never overflows a watcher that is
        keeping up.
        """
        self.seen = updates[-1][0].revision
        if self.overflow:
            return
        if len(self.pending) >= self.max_queue:
            self.overflow = True
            self.pending.clear()
            self.event.set()
            return
        before = len(self.pending)
        matches = self.matches
        self.pending.extend(item for item in updates if matches(item[0]))
        if len(self.pending) != before:
            self.event.set()

    def close(self) -> None:
        self.closing = True
        self.event.set()


class Hub:
    """Fans committed updates out to every watcher; never waits on one."""

    def __init__(self, store: Store) -> None:
        self.revision = store.head_revision()
        self.watchers: set[Watcher] = set()
        self.closed = False
        self._store = store
        store.add_listener(self._on_commit)

    def _on_commit(self, updates: Sequence[_svc.RunUpdate]) -> None:
        self.revision = updates[-1].revision
        if self.watchers:
            encoded = encode(updates)  # once per commit, whatever the number of watchers
            for watcher in self.watchers:
                watcher.offer(encoded)

    def register(self, matches: Callable[[_svc.RunUpdate], bool], max_queue: int) -> Watcher:
        watcher = Watcher(matches, max_queue, self.revision)
        if self.closed:
            watcher.close()
        self.watchers.add(watcher)
        return watcher

    def unregister(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def close(self) -> None:
        self.closed = True
        self._store.remove_listener(self._on_commit)
        for watcher in self.watchers:
            watcher.close()
