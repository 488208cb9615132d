"""The storage interface of the run-update service, and what every backend shares.

A store keeps two things: the **history**, every accepted update in revision
order (trimmed by the retention policy), and the **latest state** of every
run. It assigns revisions, applies the rules of :mod:`shellinfo_grpc.rules`
atomically with the write (through :func:`decide`), and tells its listeners
about each committed update in revision order (through
:meth:`Store.notify_listeners`). The server needs nothing else, so a backend
plugs in by implementing :class:`Store`; :mod:`shellinfo_grpc.stores._registry`
maps a URL scheme to it.

A store also says whether it can write (:meth:`Store.add_health_listener`):
a backend that finds it cannot (disk full, a read-only file, another writer)
reports it, and reports again once a write succeeds, so that the server turns
its health ``NOT_SERVING`` instead of serving reads while refusing every
write in silence.

Stores are used from one asyncio event loop.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from shellinfo_grpc._gen.shellinfo.v1 import protection_job_pb2 as _job_pb
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as _pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc
from shellinfo_grpc._status import REASON_RUN_TOO_LARGE
from shellinfo_grpc.errors import ConfigurationError, RunRejected
from shellinfo_grpc.rules import check_change, check_run

__all__ = [
    "HealthListener",
    "Item",
    "Listener",
    "PublishOutcome",
    "Retention",
    "Store",
    "decide",
    "new_update",
    "now_usecs",
]

_log = logging.getLogger("shellinfo_grpc.stores")

#: Called with the updates of one commit, in revision order.
Listener = Callable[[Sequence[_svc.RunUpdate]], None]

#: One update to record: ``(source, run, job)``; ``job`` is ``None`` when the
#: publisher gave none (the run then keeps the job it has).
Item = tuple[str, _pb.ProtectionShellInfo, _job_pb.ProtectionJob | None]
#: Called with ``(ok, why)`` when the store finds it can no longer write
#: (``ok`` false, ``why`` says why in one line), and when it can again.
HealthListener = Callable[[bool, str], None]


def now_usecs() -> int:
    """The time now in Unix microseconds: the ``accepted_time_usecs`` of an update."""
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class Retention:
    """How much history a store keeps.

    ``max_updates`` keeps at most that many of the newest updates in the
    history (0: no limit); ``max_age_seconds`` drops updates older than that
    (0: no limit). The latest state of every run is to be kept whatever the
    history retains; a backend that cannot keep that promise says so in its
    own documentation. Watches that ask for a revision older than what is
    kept end with OUT_OF_RANGE.
    """

    max_updates: int = 1_000_000
    max_age_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.max_updates < 0 or self.max_age_seconds < 0:
            raise ConfigurationError("retention limits must not be negative")


@dataclass(frozen=True, slots=True)
class PublishOutcome:
    """What a publish did: the run's current update, and whether it changed."""

    update: _svc.RunUpdate
    changed: bool


_MAX_INT64: Final = (1 << 63) - 1


def decide(
    current: _svc.RunUpdate | None,
    run: _pb.ProtectionShellInfo,
    job: _job_pb.ProtectionJob | None = None,
    *,
    max_bytes: int = 0,
) -> PublishOutcome | RunRejected | None:
    """What a store does with ``run`` (and ``job``) given the run's ``current`` update.

    The outcome to answer without writing (identical state: the current
    update, unchanged; a rule refuses it: the :class:`RunRejected`), or
    ``None`` when it is a change to record (build it with :func:`new_update`).
    The state compared is the pair (run, job); a publish without a job keeps
    the stored one, so it compares on the run alone. The final-status rule
    looks at the status only: a final run may still gain or change its job.
    ``max_bytes`` (0: none) bounds the update as stored when it keeps the
    stored job: the server checked the request's size, which lacks that job.
    Every store calls this inside its atomic section, for runs that passed
    :func:`~shellinfo_grpc.rules.check_run` in :meth:`Store.publish_batch`.
    """
    try:
        changed = check_change(current.run if current is not None else None, run)
    except RunRejected as exc:
        return exc
    if changed:
        if max_bytes and job is None and current is not None and current.HasField("job"):
            size = _svc.RunUpdate(
                source=current.source, run=run, job=current.job, revision=_MAX_INT64, accepted_time_usecs=_MAX_INT64
            ).ByteSize()
            if size > max_bytes:
                why = f"{size} bytes with the job stored for the run; the most accepted is {max_bytes}"
                return RunRejected(
                    "INVALID_ARGUMENT", REASON_RUN_TOO_LARGE, f"the update would be {why}", [("run", why)]
                )
        return None
    assert current is not None
    if job is not None and (not current.HasField("job") or current.job != job):
        return None
    return PublishOutcome(current, changed=False)


def new_update(
    source: str,
    run: _pb.ProtectionShellInfo,
    job: _job_pb.ProtectionJob | None,
    current: _svc.RunUpdate | None,
    *,
    revision: int = 0,
    accepted_time_usecs: int = 0,
) -> _svc.RunUpdate:
    """The update a store records when :func:`decide` says to: ``job``, or else the job ``current`` has."""
    update = _svc.RunUpdate(source=source, run=run, revision=revision, accepted_time_usecs=accepted_time_usecs)
    if job is not None:
        update.job.CopyFrom(job)
    elif current is not None and current.HasField("job"):
        update.job.CopyFrom(current.job)
    return update


class Store(abc.ABC):
    """A backend of the run-update service. See the module docstring.

    A backend implements the abstract methods; :meth:`record_batch` calls
    :func:`decide` for each update inside its atomic section, and after each
    commit the backend calls :meth:`notify_listeners` with the committed
    updates, in revision order. Subclasses call ``super().__init__()``.
    """

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._health_listeners: list[HealthListener] = []
        self._unwritable = ""  # why the last write failed for a reason of the store; "" while writes succeed
        #: The largest update stored (serialized, with the revision and time the store adds);
        #: 0: no limit. The server sets it to its ``max_run_bytes``; see :func:`decide`.
        self.max_update_bytes = 0

    @abc.abstractmethod
    async def start(self) -> None:
        """Open the backend (files, connections); called once before use."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release the backend."""

    async def publish_batch(
        self,
        items: Sequence[tuple[str, _pb.ProtectionShellInfo] | Item],
    ) -> list[PublishOutcome | RunRejected]:
        """Apply updates ``(source, run)`` or ``(source, run, job)``, atomically each, updates of one run in order.

        ``job`` (a ``ProtectionJob`` or ``None``) is the job the run belongs
        to; without one the run keeps the job it has (see :func:`decide`).
        Revisions follow request order within a run; across runs, a backend
        may assign them in another order (one that publishes runs
        concurrently), and outcomes always come back in request order.

        For each item, the outcome: the new or unchanged current update, or the
        :class:`RunRejected` error that refused it (nothing is recorded for a
        refused item; the others are not affected). Returns only once every
        recorded update is durable. Raises
        :class:`~shellinfo_grpc.errors.StoreUnavailable` when the backend
        cannot be reached; then nothing of the batch is acknowledged.

        Runs that can never be accepted (:func:`~shellinfo_grpc.rules.check_run`)
        are refused here, without asking the backend; the others go to
        :meth:`record_batch`, as ``(source, run, job)`` triples.
        """
        refused: dict[int, RunRejected] = {}
        triples: list[Item] = []
        for index, item in enumerate(items):
            source, run = item[0], item[1]
            job = item[2] if len(item) > 2 else None
            if (
                not isinstance(source, str)
                or not isinstance(run, _pb.ProtectionShellInfo)
                or not (job is None or isinstance(job, _job_pb.ProtectionJob))
            ):
                raise TypeError(
                    f"publish_batch takes (str, ProtectionShellInfo[, ProtectionJob | None]) items, not {item!r}"
                )
            triples.append((source, run, job))
            try:
                check_run(run)
            except RunRejected as exc:
                refused[index] = exc
        if not refused:
            return await self.record_batch(triples)
        valid = [item for index, item in enumerate(triples) if index not in refused]
        recorded = iter(await self.record_batch(valid) if valid else ())
        return [refused[index] if index in refused else next(recorded) for index in range(len(triples))]

    @abc.abstractmethod
    async def record_batch(self, items: Sequence[Item]) -> list[PublishOutcome | RunRejected]:
        """:meth:`publish_batch` for runs that passed :func:`~shellinfo_grpc.rules.check_run`.

        For each ``(source, run, job)`` item, in request order: :func:`decide`
        it against the run's current update inside the backend's atomic
        section, and record it (built by :func:`new_update`) when that says
        so. Returns once every recorded update is durable, and after
        :meth:`notify_listeners` was called for them.
        """

    async def publish(
        self, source: str, run: _pb.ProtectionShellInfo, job: _job_pb.ProtectionJob | None = None
    ) -> PublishOutcome:
        """Apply one update; raise :class:`RunRejected` if a rule refuses it."""
        (outcome,) = await self.publish_batch([(source, run, job)])
        if isinstance(outcome, RunRejected):
            raise outcome
        return outcome

    @abc.abstractmethod
    async def get(self, source: str, job_run_id: int) -> _svc.RunUpdate | None:
        """The latest update of one run, or ``None``."""

    @abc.abstractmethod
    async def list_runs(
        self, flt: _svc.RunFilter | None, after: tuple[str, int] | None, limit: int
    ) -> list[_svc.RunUpdate]:
        """Latest updates of matching runs ordered by (source, job_run_id).

        Only runs whose key is greater than ``after`` are returned, at most
        ``limit`` of them.
        """

    @abc.abstractmethod
    async def history(self, start_revision: int, end_revision: int, limit: int) -> list[_svc.RunUpdate]:
        """Updates with ``start_revision <= revision <= end_revision``, ascending, at most ``limit``.

        Raises :class:`~shellinfo_grpc.errors.HistoryExpired` when
        ``start_revision`` is older than the oldest retained revision.
        """

    async def history_wire(self, start_revision: int, end_revision: int, limit: int) -> list[tuple[int, bytes]]:
        """As :meth:`history`, as ``(revision, serialized RunUpdate)`` pairs.

        An unfiltered watch catches up by sending these bytes as they are; a
        backend that keeps them overrides this to skip decoding.
        """
        return [(u.revision, u.SerializeToString()) for u in await self.history(start_revision, end_revision, limit)]

    @abc.abstractmethod
    async def snapshot(self, flt: _svc.RunFilter | None) -> tuple[list[_svc.RunUpdate], int]:
        """The latest update of every matching run, in revision order, and the
        head revision they are consistent with."""

    @abc.abstractmethod
    def head_revision(self) -> int:
        """The revision of the newest committed update (0 when there is none)."""

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(updates)`` once for every commit from now on.

        ``updates`` are the updates of that commit, in revision order; calls
        happen on the event loop, in revision order, after the updates are
        durable and readable through :meth:`history`. Listeners must not raise
        and must not block: the server's listener only queues.
        """
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (a server that stops removes its own)."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def notify_listeners(self, updates: Sequence[_svc.RunUpdate]) -> None:
        """Tell every listener about the updates of one commit (a backend calls this).

        A listener that raises is logged and does not stop the others, nor
        the store.
        """
        if not updates:
            return
        for listener in tuple(self._listeners):
            try:
                listener(updates)
            except Exception:
                _log.exception(
                    "%s: a listener failed on revisions %d..%d", self, updates[0].revision, updates[-1].revision
                )

    def add_health_listener(self, listener: HealthListener) -> None:
        """Call ``listener(ok, why)`` whenever the store's ability to write changes.

        ``ok`` is false once a write failed for a reason of the store (disk
        full, read-only file, another writer; ``why`` says which, in one
        line), and true again after the next write that succeeds. Calls
        happen on the event loop, only on a change; the store is writable
        until it says otherwise. Listeners must not raise and must not block.
        """
        self._health_listeners.append(listener)

    def remove_health_listener(self, listener: HealthListener) -> None:
        """Stop calling ``listener`` about the store's health."""
        with contextlib.suppress(ValueError):
            self._health_listeners.remove(listener)

    @property
    def unwritable(self) -> str:
        """Why the store cannot write now, in one line; ``""`` while it can."""
        return self._unwritable

    def report_writable(self, ok: bool, why: str = "") -> None:
        """Record whether writes succeed (a backend calls this after each write or failed write).

        A change is logged (an error when writes start failing, with why)
        and told to every health listener; a repeat of the same state is not.
        """
        why = " ".join(why.split()) or "a write failed"
        if ok == (not self._unwritable):
            return
        if ok:
            _log.warning("%s: writes succeed again (they failed: %s)", self, self._unwritable)
            self._unwritable = ""
        else:
            _log.error("%s cannot write: %s", self, why)
            self._unwritable = why
        for listener in tuple(self._health_listeners):
            try:
                listener(ok, "" if ok else why)
            except Exception:
                _log.exception("%s: a health listener failed", self)

    def __str__(self) -> str:
        return f"store {type(self).__name__}"
