"""An in-memory store: for tests and throwaway use; nothing survives the process."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc
from shellinfo_grpc.errors import HistoryExpired, RunRejected
from shellinfo_grpc.rules import compile_filter
from shellinfo_grpc.stores import Item, PublishOutcome, Retention, Store, decide, new_update, now_usecs

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Keeps history and latest states in dictionaries and a deque."""

    def __init__(self, *, retention: Retention | None = None) -> None:
        super().__init__()
        self._retention = retention or Retention()
        # The history is a list with a moving start (_base): trimming advances
        # _base, and the list is compacted when half of it is trimmed. Reads
        # index it directly (revisions in it are contiguous).
        self._history: list[_svc.RunUpdate] = []
        self._base = 0
        self._runs: dict[tuple[str, int], _svc.RunUpdate] = {}
        self._keys: list[tuple[str, int]] = []  # sorted keys of _runs
        self._head = 0
        self._oldest = 1  # oldest revision a watch may start from

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to release."""

    async def record_batch(self, items: Sequence[Item]) -> list[PublishOutcome | RunRejected]:
        """Apply updates in order; each is atomic by running without an await."""
        outcomes: list[PublishOutcome | RunRejected] = []
        committed: list[_svc.RunUpdate] = []
        for source, run, job in items:
            key = (source, run.job_run_id)
            current = self._runs.get(key)
            outcome = decide(current, run, job, max_bytes=self.max_update_bytes)
            if outcome is not None:
                outcomes.append(outcome)
                continue
            update = new_update(source, run, job, current, revision=self._head + 1, accepted_time_usecs=now_usecs())
            self._head = update.revision
            if current is None:
                bisect.insort(self._keys, key)
            self._runs[key] = update
            self._history.append(update)
            committed.append(update)
            outcomes.append(PublishOutcome(update, changed=True))
        self._trim()
        self.notify_listeners(committed)
        return outcomes

    def _trim(self) -> None:
        history, base = self._history, self._base
        limit = self._retention.max_updates
        if limit and len(history) - base > limit:
            base = len(history) - limit
        if self._retention.max_age_seconds:
            cutoff = now_usecs() - int(self._retention.max_age_seconds * 1_000_000)
            while base < len(history) and history[base].accepted_time_usecs < cutoff:
                base += 1
        if base != self._base:
            self._oldest = history[base - 1].revision + 1
            if base > len(history) // 2:
                del history[:base]
                base = 0
            self._base = base

    async def get(self, source: str, job_run_id: int) -> _svc.RunUpdate | None:
        """The latest update of one run, or ``None``."""
        return self._runs.get((source, job_run_id))

    async def list_runs(
        self, flt: _svc.RunFilter | None, after: tuple[str, int] | None, limit: int
    ) -> list[_svc.RunUpdate]:
        """Latest updates of matching runs ordered by key, after ``after``."""
        matches = compile_filter(flt)
        start = bisect.bisect_right(self._keys, after) if after is not None else 0
        out: list[_svc.RunUpdate] = []
        if limit <= 0:
            return out
        for key in self._keys[start:]:
            update = self._runs[key]
            if matches(update):
                out.append(update)
                if len(out) >= limit:
                    break
        return out

    async def history(self, start_revision: int, end_revision: int, limit: int) -> list[_svc.RunUpdate]:
        """Updates in ``[start_revision, end_revision]``, ascending, at most ``limit``."""
        self._trim()
        if start_revision < self._oldest:
            raise HistoryExpired(start_revision, self._oldest)
        history, base = self._history, self._base
        if base >= len(history) or limit <= 0:
            return []
        first = history[base].revision
        start = base + max(start_revision - first, 0)
        stop = min(len(history), base + end_revision - first + 1, start + limit)
        return history[start:stop] if stop > start else []

    async def snapshot(self, flt: _svc.RunFilter | None) -> tuple[list[_svc.RunUpdate], int]:
        """Latest update of every matching run, in revision order, and the head."""
        matches = compile_filter(flt)
        updates = sorted((u for u in self._runs.values() if matches(u)), key=lambda u: u.revision)
        return updates, self._head

    def head_revision(self) -> int:
        """The newest committed revision."""
        return self._head
