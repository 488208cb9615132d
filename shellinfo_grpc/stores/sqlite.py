"""The embedded SQLite store (``sqlite:///PATH``): an update is acknowledged only once it is durable.

Layout of the file (schema version 3, ``PRAGMA user_version``; the file is
marked with ``PRAGMA application_id``; :data:`_MIGRATIONS` brings a version 1
or 2 file up to date on start):

* ``updates``: the history, one row per accepted update, keyed by
  ``revision``, with ``source``, ``job_run_id``, ``accepted_usecs``, ``run``
  (the run, deterministic protobuf bytes) and ``wire`` (the whole serialized
  ``RunUpdate``, which an unfiltered watch sends as it is; NULL in rows that
  version 1 wrote, which are encoded when read) and ``job`` (the update's
  ``ProtectionJob``, protobuf bytes; NULL when it has none, as in every row
  written before version 3). Trimmed from the oldest end by the retention policy.
* ``runs``: the latest update of every run, keyed by (``source``,
  ``job_run_id``), with ``revision``, ``accepted_usecs``, ``run`` and ``job``;
  never trimmed. ``status``, ``run_type`` and ``job_id`` are copied out of the
  messages (NULL when unset) so that filters run in SQL.
* ``meta``: ``head`` (the newest revision ever assigned) and ``oldest`` (the
  oldest revision a watch may start from), so that revisions are never reused,
  even when the whole history was trimmed and the process restarts.

On start the file is checked before anything is served: it must be this
application's (``application_id``) at a schema version this code knows, with
every table and column, both ``meta`` rows as integers, a head at or beyond
every revision in ``updates`` and ``runs`` (otherwise revisions would be
handed out twice), and a history that runs from ``oldest`` to the head.
Anything else is a one-line :class:`~shellinfo_grpc.errors.ConfigurationError`:
the store does not start, and the file is left as it is.

One file, one server: the store holds an exclusive ``fcntl.flock`` on
``PATH.lock`` (which holds the owner's process id) from start to close, so
a second store on the same file, in this process or another, refuses to
start. As a second line of defence, each write transaction checks that the
head in the file is the one this store last wrote.

Writes that fail for a reason of the file (disk full, read-only, I/O error)
are reported through :meth:`~shellinfo_grpc.stores.Store.report_writable`,
and again once a write succeeds: the server turns its health accordingly.
While writes fail, the store tries a write of the same size every two seconds
(a row in ``meta``, written and deleted), so that it turns writable again by
itself: a server that its health took out of a load balancer's rotation would
otherwise get no publish to find out, and a write smaller than the one that
failed could succeed on a disk that is still full.

Concurrency: the event loop never touches SQLite. One thread owns the writing
connection, another the reading one (WAL lets readers run beside the writer).
Concurrent :meth:`SqliteStore.record_batch` calls are queued; a writer task
takes everything queued, applies it in one ``BEGIN IMMEDIATE ... COMMIT``
transaction (group commit: one fsync for many publishers), then, on the event
loop, advances :meth:`SqliteStore.head_revision`, calls the listeners in
revision order and resolves every caller. Within the transaction the rules
see the runs as changed by the earlier batches; a batch that fails in an
unexpected way is left out and fails alone. A failed transaction (I/O error,
disk full) fails every caller of its group with
:class:`~shellinfo_grpc.errors.StoreUnavailable`, and nothing of it is
recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from google.protobuf.message import DecodeError

from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc
from shellinfo_grpc.errors import ConfigurationError, HistoryExpired, RunRejected, StoreUnavailable
from shellinfo_grpc.rules import compile_filter
from shellinfo_grpc.stores import Item, PublishOutcome, Retention, Store, decide, new_update, now_usecs

__all__ = ["SqliteStore"]

_log = logging.getLogger("shellinfo_grpc.sqlite_store")  # its name before the move, kept for log filters

_T = TypeVar("_T")

#: "SHLI": marks a file as a shellinfo store (``PRAGMA application_id``).
_APPLICATION_ID: Final = 0x5348_4C49
#: The schema version this code writes (``PRAGMA user_version``).
SCHEMA_VERSION: Final = 3

#: Statements that bring the schema from version ``n - 1`` to ``n``.
_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
        "INSERT INTO meta (key, value) VALUES ('head', 0), ('oldest', 1)",
        """CREATE TABLE updates (
            revision INTEGER PRIMARY KEY,
            source TEXT NOT NULL,
            job_run_id INTEGER NOT NULL,
            accepted_usecs INTEGER NOT NULL,
            run BLOB NOT NULL
        )""",
        """CREATE TABLE runs (
            source TEXT NOT NULL,
            job_run_id INTEGER NOT NULL,
            revision INTEGER NOT NULL,
            accepted_usecs INTEGER NOT NULL,
            status INTEGER,
            run_type INTEGER,
            run BLOB NOT NULL,
            PRIMARY KEY (source, job_run_id)
        ) WITHOUT ROWID""",
    ),
    # Each update's serialized RunUpdate, so that a watch catches up by
    # passing stored bytes through (rows from version 1 have NULL here).
    2: ("ALTER TABLE updates ADD COLUMN wire BLOB",),
    # The job each update was published with (RunUpdate.job), and its id
    # copied out for the job_ids filter; NULL in older rows (no job).
    3: (
        "ALTER TABLE updates ADD COLUMN job BLOB",
        "ALTER TABLE runs ADD COLUMN job BLOB",
        "ALTER TABLE runs ADD COLUMN job_id INTEGER",
    ),
}

#: The columns of each table at :data:`SCHEMA_VERSION`, checked on start.
_COLUMNS: Final[dict[str, frozenset[str]]] = {
    "meta": frozenset({"key", "value"}),
    "updates": frozenset({"revision", "source", "job_run_id", "accepted_usecs", "run", "wire", "job"}),
    "runs": frozenset(
        {"source", "job_run_id", "revision", "accepted_usecs", "status", "run_type", "run", "job", "job_id"}
    ),
}

_SYNCHRONOUS: Final = frozenset({"NORMAL", "FULL", "EXTRA"})
_BUSY_TIMEOUT_MS: Final = 10_000
_PROBE_SECONDS: Final = 2.0  # between the write probes while writes fail
_PROBE_MAX_BYTES: Final = 8 << 20  # the largest write probe
#: Most items committed in one transaction; the rest wait for the next one.
_MAX_GROUP_ITEMS: Final = 10_000
#: Most rows a catch-up reads ahead while the previous chunk is sent ...
_READ_AHEAD: Final = 16_000
#: ... and about the most bytes (estimated from the previous chunk).
_AHEAD_BYTES: Final = 4 << 20
#: Catch-ups whose next chunk is kept read ahead at a time (the oldest is dropped).
_MAX_AHEAD: Final = 8
#: Bytes of the file the reading connection maps into memory (fewer copies than read()).
_MMAP_BYTES: Final = 1 << 30
#: Longest filter list pushed into an SQL ``IN (...)``; longer ones are checked in Python.
_MAX_SQL_IN: Final = 500
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

_Key = tuple[str, int]
_Change = tuple[_svc.RunUpdate, bytes]  # an accepted update and its run's stored bytes
_BatchResult = list[PublishOutcome | RunRejected] | Exception


def _said(exc: BaseException) -> str:
    """What an error says, on one line and bounded (SQLite quotes damaged schema text, newlines and all)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:199] + "…"


def _clamp64(value: int) -> int:
    return min(max(value, _INT64_MIN), _INT64_MAX)


def _decode(source: str, revision: int, accepted_usecs: int, blob: bytes, job: bytes | None) -> _svc.RunUpdate:
    update = _svc.RunUpdate(source=source, revision=revision, accepted_time_usecs=accepted_usecs)
    update.run.SetInParent()
    try:
        update.run.MergeFromString(blob)
        if job is not None:
            update.job.MergeFromString(job)
    except DecodeError as exc:
        raise StoreUnavailable(f"the stored update with revision {revision} is corrupt: {_said(exc)}") from exc
    return update


def _job(update: _svc.RunUpdate) -> bytes | None:
    """The stored form of an update's job: deterministic protobuf bytes, or NULL for none."""
    return update.job.SerializeToString(deterministic=True) if update.HasField("job") else None


def _filter_sql(flt: _svc.RunFilter | None) -> tuple[str, list[Any]]:
    """The part of ``flt`` SQL can check, as ``AND ...`` clauses and their parameters."""
    if flt is None:
        return "", []
    sql: list[str] = []
    params: list[Any] = []
    columns: tuple[tuple[str, Sequence[Any]], ...] = (
        ("source", flt.sources),
        ("job_run_id", flt.job_run_ids),
        ("status", flt.statuses),
        ("run_type", flt.run_types),
        ("job_id", flt.job_ids),
    )
    for column, values in columns:
        unique = sorted(set(values))
        if unique and len(unique) <= _MAX_SQL_IN:
            sql.append(f" AND {column} IN ({', '.join('?' * len(unique))})")
            params.extend(unique)
    return "".join(sql), params


@dataclass(slots=True)
class _Pending:
    """One caller's batch waiting for the writer."""

    items: list[Item]
    future: asyncio.Future[list[PublishOutcome | RunRejected]]


@dataclass(slots=True)
class _GroupResult:
    """What one writer transaction did."""

    results: list[_BatchResult]
    committed: list[_svc.RunUpdate] = field(default_factory=list)
    head: int = 0


def _ahead_rows(rows: Sequence[tuple[int, bytes]], limit: int) -> int:
    """Rows to read ahead after ``rows``: :data:`_AHEAD_BYTES` worth at their (sampled) size, at least ``limit``."""
    sample = rows[:: max(1, len(rows) // 16)]
    size = sum(len(data) for _, data in sample) / len(sample) + 16
    return max(limit, min(_READ_AHEAD, int(_AHEAD_BYTES / size)))


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _resolve(future: asyncio.Future[_T], value: _T) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class SqliteStore(Store):
    """A :class:`~shellinfo_grpc.stores.Store` in one SQLite file, in WAL mode.

    ``synchronous`` is the SQLite ``PRAGMA synchronous`` of the writing
    connection: ``"FULL"`` (the default) makes every acknowledged update
    survive a power loss; ``"NORMAL"`` survives a crash of the process but may
    lose the last commits on a power loss; ``"EXTRA"`` also syncs the
    directory. One store serves a file at a time (``PATH.lock``, see the module docstring).
    """

    def __init__(self, path: Path, *, retention: Retention | None = None, synchronous: str = "FULL") -> None:
        mode = synchronous.upper()
        if mode not in _SYNCHRONOUS:
            raise ConfigurationError(f"synchronous={synchronous!r}: use one of {', '.join(sorted(_SYNCHRONOUS))}")
        super().__init__()
        self._path = Path(path)
        self._retention = retention or Retention()
        self._synchronous = mode
        self._head = 0  # newest revision whose listeners have been called (event loop)
        self._queue: list[_Pending] = []
        self._writer_task: asyncio.Task[None] | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._closing = False
        self._closed = asyncio.Event()
        # Owned by the writer thread.
        self._wconn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._w_head = 0
        self._w_oldest = 1
        # Owned by the reader thread.
        self._rconn: sqlite3.Connection | None = None
        # Catch-up reads ahead (event loop): (start, end) -> rows being read or read.
        self._ahead: dict[tuple[int, int], asyncio.Future[list[tuple[int, bytes]]]] = {}
        self._legacy_end = 0  # newest revision stored without its wire form (schema version 1), 0: none
        self._probe_interval = _PROBE_SECONDS
        self._prober: asyncio.Task[None] | None = None  # tries a write while writes fail
        self._probe_bytes = 0  # the size of the largest write that failed (up to _PROBE_MAX_BYTES)

    def __str__(self) -> str:
        return f"store {self._path}"

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Create or open the file, bring the schema up to date and load the head revision.

        Raises :class:`ConfigurationError` when the file cannot be used.
        """
        if self._writer is not None or self._closing:
            raise ConfigurationError(f"store {self._path}: start() may be called once")
        loop = asyncio.get_running_loop()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shellinfo-sqlite-writer")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shellinfo-sqlite-reader")
        try:
            self._head = await loop.run_in_executor(self._writer, self._open_writer)
            await loop.run_in_executor(self._reader, self._open_reader)
        except BaseException:
            await self._release(loop)
            raise

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise ConfigurationError(f"store {self._path}: cannot open the SQLite file: {_said(exc)}") from exc
        return conn

    def _open_writer(self) -> int:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"store {self._path}: cannot create its directory: {_said(exc)}") from exc
        if self._path.is_dir():
            raise ConfigurationError(f"store {self._path}: is a directory; give the path of a file")
        self._lock()
        with contextlib.suppress(OSError):
            if self._path.stat().st_size == 0:
                # A file SQLite would take for a new, empty store: one truncated by
                # accident would start handing out revision 1 again.
                raise ConfigurationError(
                    f"store {self._path}: an empty file, not a shellinfo store; remove it to start a new store"
                )
        conn = self._connect()
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            self._check_identity(conn)
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise ConfigurationError(f"store {self._path}: SQLite cannot use WAL mode here (journal_mode={mode})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            self._migrate(conn)
            self._w_head, self._w_oldest = self._check_contents(conn)
            self._check_writable(conn)
            # Rows schema version 1 wrote have no wire form; history_wire checks for them only up to here.
            (legacy,) = conn.execute("SELECT max(revision) FROM updates WHERE wire IS NULL").fetchone()
            self._legacy_end = legacy or 0
        except (sqlite3.Error, UnicodeDecodeError) as exc:  # the latter: text in the file that is not UTF-8
            conn.close()
            raise ConfigurationError(f"store {self._path}: not a usable shellinfo SQLite store: {_said(exc)}") from exc
        except BaseException:
            conn.close()
            raise
        self._wconn = conn
        return self._w_head

    def _lock(self) -> None:
        """Take the exclusive lock on ``PATH.lock``, or refuse: another store serves the file."""
        lock_path = self._path.with_name(self._path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigurationError(
                f"store {self._path}: cannot open its lock file {lock_path}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
            os.close(fd)
            if isinstance(exc, BlockingIOError):
                raise ConfigurationError(
                    f"store {self._path}: another process{holder} serves this file; one store file, one server"
                ) from None
            raise ConfigurationError(f"store {self._path}: cannot lock {lock_path}: {exc.strerror}") from None
        with contextlib.suppress(OSError):  # the pid is for the message above; the lock is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _check_identity(self, conn: sqlite3.Connection) -> None:
        (app_id,) = conn.execute("PRAGMA application_id").fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if app_id not in (0, _APPLICATION_ID):
            raise ConfigurationError(f"store {self._path}: another application's SQLite file (application_id {app_id})")
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"store {self._path}: schema version {version} was written by a newer shellinfo-grpc "
                f"(this one knows up to {SCHEMA_VERSION})"
            )
        (tables,) = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        if app_id == 0 and tables:
            raise ConfigurationError(f"store {self._path}: a SQLite file that is not a shellinfo store")
        if app_id == _APPLICATION_ID and (version < 1 or not tables):
            raise ConfigurationError(
                f"store {self._path}: damaged: marked as a shellinfo store but schema version {version}"
                f" with {tables} schema object(s)"
            )

    def _check_contents(self, conn: sqlite3.Connection) -> tuple[int, int]:
        """The head and the oldest revision, once the tables and ``meta`` are checked to be whole and consistent.

        The head must be at or beyond every revision stored anywhere: a
        store that started below one would hand that revision out again.
        """
        damaged = f"store {self._path}: damaged"
        for table, expected in _COLUMNS.items():
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if not columns:
                raise ConfigurationError(f"{damaged}: the table {table!r} is missing")
            if expected - columns:
                raise ConfigurationError(
                    f"{damaged}: the table {table!r} lacks the column(s) {', '.join(sorted(expected - columns))}"
                )
        meta: dict[str, int] = {}
        for key in ("head", "oldest"):
            rows = conn.execute("SELECT value, typeof(value) FROM meta WHERE key = ?", (key,)).fetchall()
            if len(rows) != 1:
                raise ConfigurationError(f"{damaged}: the meta row {key!r} is missing")
            (value, kind) = rows[0]
            if kind != "integer":
                raise ConfigurationError(
                    f"{damaged}: the meta row {key!r} holds {kind} {str(value)[:40]!r}, not an integer"
                )
            meta[key] = value
        head, oldest = meta["head"], meta["oldest"]
        if head < 0 or not 1 <= oldest <= head + 1:
            raise ConfigurationError(f"{damaged}: meta head {head} and oldest {oldest} contradict each other")
        # One pass over runs (no index on its revision); the ends of updates by its key.
        # SQLite orders text and blobs after numbers, so a max() that is no integer shows them.
        (high, odd) = conn.execute("SELECT max(revision), sum(typeof(revision) != 'integer') FROM runs").fetchone()
        (low_update,) = conn.execute("SELECT min(revision) FROM updates").fetchone()
        (high_update,) = conn.execute("SELECT max(revision) FROM updates").fetchone()
        for table, newest, others in (("updates", high_update, 0), ("runs", high, odd)):
            if others or not isinstance(newest, int | None):
                raise ConfigurationError(f"{damaged}: {table!r} holds a revision that is not an integer")
            if newest is not None and newest > head:
                raise ConfigurationError(
                    f"{damaged}: {table!r} holds revision {newest}, beyond the head {head};"
                    " starting would hand out revisions twice"
                )
        # The history is always the revisions oldest..head (none when oldest is
        # head + 1): a watch from a revision it lacks would skip it in silence.
        if (low_update, high_update) != ((oldest, head) if oldest <= head else (None, None)):
            held = f"{low_update}..{high_update}" if low_update is not None else "none"
            raise ConfigurationError(
                f"{damaged}: the history should hold the revisions {oldest}..{head} but holds {held}"
            )
        return head, oldest

    async def _probe(self) -> None:
        """While writes fail: every ``_probe_interval`` s, a write as large as the failed one, until one commits."""
        loop = asyncio.get_running_loop()
        try:
            while self.unwritable and not self._closing:
                await asyncio.sleep(self._probe_interval)
                writer = self._writer
                if writer is None or self._closing or not self.unwritable:
                    return
                try:
                    await loop.run_in_executor(writer, self._write_probe, self._probe_bytes)
                except (sqlite3.Error, StoreUnavailable):
                    continue  # still failing: health stays NOT_SERVING, the log said why
                self._probe_bytes = 0
                self.report_writable(True)
        finally:
            self._prober = None

    def _write_probe(self, size: int) -> None:
        """Writer thread: commit a ``meta`` row of ``size`` bytes, then delete it (its own transactions).

        Like a commit, it fails while another process has written the file
        (the head there is not this store's): that is no state to call writable.
        """
        conn = self._wconn
        if conn is None:
            raise StoreUnavailable(f"store {self._path} is closed")
        (stored_head,) = conn.execute("SELECT value FROM meta WHERE key = 'head'").fetchone()
        if stored_head != self._w_head:
            raise StoreUnavailable(f"store {self._path}: another process wrote revision {stored_head}")
        _write(conn, "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', zeroblob(?))", size)
        _write(conn, "DELETE FROM meta WHERE key = 'probe'")

    def _check_writable(self, conn: sqlite3.Connection) -> None:
        """Write once (the head, unchanged): SQLite opens a file it may not write read-only, in silence.

        A store that cannot write at start refuses to start rather than
        serve reads and refuse every publish; one that stops being able to
        later reports it (:meth:`~shellinfo_grpc.stores.Store.report_writable`).
        """
        try:
            _write(conn, "UPDATE meta SET value = value WHERE key = 'head'")
        except sqlite3.Error as exc:
            raise ConfigurationError(f"store {self._path}: cannot write the file: {_said(exc)}") from exc

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            for target in range(max(version, 0) + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise

    def _open_reader(self) -> None:
        conn = self._connect()
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA query_only = ON")
            conn.execute(f"PRAGMA mmap_size = {_MMAP_BYTES}")
        except sqlite3.Error as exc:
            conn.close()
            raise ConfigurationError(f"store {self._path}: cannot open a reading connection: {_said(exc)}") from exc
        self._rconn = conn

    async def close(self) -> None:
        """Commit everything queued, then close the connections and threads. Safe to call twice."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        if self._prober is not None:
            self._prober.cancel()
        for ahead in self._ahead.values():
            ahead.cancel()
        self._ahead.clear()
        try:
            while self._writer_task is not None:
                await asyncio.wait((self._writer_task,))
        finally:
            await self._release(asyncio.get_running_loop())

    async def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            for executor, closer in ((self._reader, self._close_reader), (self._writer, self._close_writer)):
                if executor is not None:
                    try:
                        await loop.run_in_executor(executor, closer)
                    except sqlite3.Error as exc:  # pragma: no cover - closing rarely fails
                        _log.warning("store %s: closing a connection failed: %s", self._path, exc)
                    executor.shutdown(wait=True)
        finally:
            self._reader = self._writer = None
            self._closing = True
            self._closed.set()

    def _close_reader(self) -> None:
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    def _close_writer(self) -> None:
        try:
            if self._wconn is not None:
                self._wconn.close()  # the last connection: SQLite checkpoints and removes the WAL
                self._wconn = None
        finally:
            self._unlock()

    # -- writing ---------------------------------------------------------------

    async def record_batch(self, items: Sequence[Item]) -> list[PublishOutcome | RunRejected]:
        """Queue the batch for the next group commit; return once it is committed and durable."""
        batch = list(items)
        if self._closing or self._writer is None:
            raise StoreUnavailable(f"store {self._path} is {'closed' if self._closing else 'not started'}")
        if not batch:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[PublishOutcome | RunRejected]] = loop.create_future()
        self._queue.append(_Pending(batch, future))
        if self._writer_task is None:
            self._writer_task = loop.create_task(self._drain(), name=f"shellinfo-sqlite-writer {self._path}")
        return await future

    async def _drain(self) -> None:
        """Commit queued batches, a group at a time, until the queue is empty."""
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                group: list[_Pending] = []
                size = cut = 0
                while cut < len(self._queue):
                    count = len(self._queue[cut].items)
                    if group and size + count > _MAX_GROUP_ITEMS:
                        break
                    group.append(self._queue[cut])
                    size += count
                    cut += 1
                del self._queue[:cut]
                group = [pending for pending in group if not pending.future.done()]  # callers gone
                if not group:
                    continue
                writer = self._writer
                if writer is None:  # pragma: no cover - close() waits for this task before releasing
                    raise StoreUnavailable(f"store {self._path} is closed")
                job = loop.run_in_executor(writer, self._commit_group, [pending.items for pending in group])
                # Delivery is a callback of the job, not of this task: even if this
                # task is cancelled, a commit that happened is reported.
                job.add_done_callback(functools.partial(self._deliver, group))
                await asyncio.wait((job,))
        finally:
            self._writer_task = None
            leftover, self._queue = self._queue, []
            for pending in leftover:
                _fail(pending.future, StoreUnavailable(f"store {self._path} is shutting down"))

    def _deliver(self, group: list[_Pending], job: asyncio.Future[_GroupResult]) -> None:
        """On the event loop, after a commit: advance the head, call listeners, resolve callers."""
        if job.cancelled():  # pragma: no cover - jobs are never cancelled
            for pending in group:
                _fail(pending.future, StoreUnavailable(f"store {self._path}: the write was cancelled"))
            return
        exc = job.exception()
        if exc is not None:
            if not self._closing:  # say why in SQLite's words, or the store's own when it refused
                cause = exc.__cause__ if isinstance(exc.__cause__, sqlite3.Error) else None
                self.report_writable(False, _said(cause) if cause else getattr(exc, "message", _said(exc)))
                size = sum(run.ByteSize() for pending in group for _, run, _ in pending.items)
                self._probe_bytes = min(_PROBE_MAX_BYTES, max(self._probe_bytes, size))
                if self._prober is None:
                    self._prober = asyncio.get_running_loop().create_task(self._probe())
            for pending in group:  # one exception object per caller: each gets its own traceback
                if isinstance(exc, StoreUnavailable):
                    error: BaseException = StoreUnavailable(exc.message)
                    error.__cause__ = exc.__cause__
                else:
                    error = self._unavailable("cannot write", exc)
                _fail(pending.future, error)
            return
        done = job.result()
        self._head = done.head
        if done.committed:
            self.report_writable(True)
        self.notify_listeners(done.committed)
        for pending, result in zip(group, done.results, strict=True):
            if isinstance(result, Exception):
                _fail(pending.future, result)
            else:
                _resolve(pending.future, result)

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        error = StoreUnavailable(f"store {self._path}: {what}: {_said(exc)}")
        error.__cause__ = exc
        return error

    def _commit_group(self, batches: list[list[Item]]) -> _GroupResult:
        """Writer thread: apply every batch in one transaction.

        The rules see the runs as changed by the earlier items of the same
        transaction (an overlay of the new latest states), and the rows are
        written at the end with ``executemany``. A batch that fails in an
        unexpected way is left out of the overlay and fails alone.
        """
        conn = self._wconn
        if conn is None:
            raise StoreUnavailable(f"store {self._path} is closed")
        now = now_usecs()
        head = self._w_head
        oldest = self._w_oldest
        done = _GroupResult(results=[])
        latest: dict[_Key, _Change] = {}  # runs changed by this transaction
        history: list[_Change] = []  # updates recorded by this transaction
        with self._transaction(conn, "cannot write"):
            conn.execute("BEGIN IMMEDIATE")
            (stored_head,) = conn.execute("SELECT value FROM meta WHERE key = 'head'").fetchone()
            if stored_head != head:
                raise StoreUnavailable(
                    f"store {self._path}: another process wrote revision {stored_head} "
                    f"(this one is at {head}); only one server may use a file"
                )
            for batch in batches:
                changes: dict[_Key, _Change] = {}
                recorded: list[_Change] = []
                try:
                    outcomes = self._apply(
                        conn, batch, head=head, now=now, latest=latest, changes=changes, recorded=recorded
                    )
                except sqlite3.Error:
                    raise  # the transaction as a whole is in doubt
                except Exception as exc:
                    done.results.append(exc)
                    continue
                done.results.append(outcomes)
                if recorded:
                    head = recorded[-1][0].revision
                    latest.update(changes)
                    history.extend(recorded)
            if history:
                self._write(conn, history, latest, head)
                oldest = self._trim(conn, head, oldest, now)
            conn.execute("COMMIT")
        done.committed = [update for update, _ in history]
        self._w_head = done.head = head
        self._w_oldest = oldest
        return done

    def _apply(
        self,
        conn: sqlite3.Connection,
        batch: list[Item],
        *,
        head: int,
        now: int,
        latest: dict[_Key, _Change],
        changes: dict[_Key, _Change],
        recorded: list[_Change],
    ) -> list[PublishOutcome | RunRejected]:
        """Check one batch; put its new latest states in ``changes`` and its updates in ``recorded``."""
        outcomes: list[PublishOutcome | RunRejected] = []
        for source, run, job in batch:
            key = (source, run.job_run_id)
            change = changes.get(key) or latest.get(key)
            if change is not None:
                current: _svc.RunUpdate | None = change[0]
            elif run.HasField("job_run_id"):
                row = conn.execute(
                    "SELECT revision, accepted_usecs, run, job FROM runs WHERE source = ? AND job_run_id = ?", key
                ).fetchone()
                current = _decode(source, *row) if row is not None else None
            else:
                current = None
            outcome = decide(current, run, job, max_bytes=self.max_update_bytes)
            if outcome is not None:
                outcomes.append(outcome)
                continue
            head += 1
            update = new_update(source, run, job, current, revision=head, accepted_time_usecs=now)
            change = (update, update.run.SerializeToString(deterministic=True))
            changes[key] = change
            recorded.append(change)
            outcomes.append(PublishOutcome(update, changed=True))
        return outcomes

    @staticmethod
    def _write(conn: sqlite3.Connection, history: list[_Change], latest: dict[_Key, _Change], head: int) -> None:
        """Inside a write transaction: record the new updates and latest states, and the head."""
        conn.executemany(
            "INSERT INTO updates (revision, source, job_run_id, accepted_usecs, run, wire, job)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (u.revision, u.source, u.run.job_run_id, u.accepted_time_usecs, blob, u.SerializeToString(), _job(u))
                for u, blob in history
            ],
        )
        conn.executemany(
            "INSERT OR REPLACE INTO runs"
            " (source, job_run_id, revision, accepted_usecs, status, run_type, run, job, job_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    u.source,
                    u.run.job_run_id,
                    u.revision,
                    u.accepted_time_usecs,
                    u.run.status if u.run.HasField("status") else None,
                    u.run.run_type if u.run.HasField("run_type") else None,
                    blob,
                    _job(u),
                    u.job.job_id if u.job.HasField("job_id") else None,
                )
                for u, blob in latest.values()
            ],
        )
        conn.execute("UPDATE meta SET value = ? WHERE key = 'head'", (head,))

    def _trim(self, conn: sqlite3.Connection, head: int, oldest: int, now: int) -> int:
        """Inside a write transaction: drop history beyond the retention; return the new oldest revision."""
        keep = oldest
        if self._retention.max_updates:
            keep = max(keep, head - self._retention.max_updates + 1)
        if self._retention.max_age_seconds:
            cutoff = now - int(self._retention.max_age_seconds * 1_000_000)
            row = conn.execute(
                "SELECT revision FROM updates WHERE revision >= ? AND accepted_usecs >= ? ORDER BY revision LIMIT 1",
                (keep, cutoff),
            ).fetchone()
            keep = max(keep, row[0] if row is not None else head + 1)
        if keep > oldest:
            conn.execute("DELETE FROM updates WHERE revision < ?", (keep,))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'oldest'", (keep,))
        return keep

    def _trim_now(self) -> None:
        """Writer thread: apply the retention without a write (for age limits while idle)."""
        conn = self._wconn
        if conn is None:
            raise StoreUnavailable(f"store {self._path} is closed")
        with self._transaction(conn, "cannot trim the history"):
            conn.execute("BEGIN IMMEDIATE")
            self._w_oldest = self._trim(conn, self._w_head, self._w_oldest, now_usecs())
            conn.execute("COMMIT")

    # -- reading ---------------------------------------------------------------

    async def _on(self, executor: ThreadPoolExecutor | None, func: Callable[[], _T]) -> _T:
        """Run ``func`` on the writer's or the reader's thread."""
        if executor is None or self._closed.is_set():
            raise StoreUnavailable(f"store {self._path} is {'closed' if self._closing else 'not started'}")
        try:
            job = asyncio.get_running_loop().run_in_executor(executor, func)
        except RuntimeError as exc:  # shut down by a concurrent close()
            raise StoreUnavailable(f"store {self._path} is closed") from exc
        return await job

    async def _read(self, func: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._on(self._reader, functools.partial(self._run_read, func))

    def _run_read(self, func: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._rconn
        if conn is None:
            raise StoreUnavailable(f"store {self._path} is closed")
        with self._transaction(conn, "cannot read"):
            conn.execute("BEGIN")
            result = func(conn)
            conn.execute("COMMIT")
        return result

    @contextlib.contextmanager
    def _transaction(self, conn: sqlite3.Connection, what: str) -> Iterator[None]:
        """Roll back what the body began if it fails; an SQLite error becomes StoreUnavailable."""
        try:
            yield
        except BaseException as exc:
            try:
                if conn.in_transaction:
                    conn.rollback()
            except sqlite3.Error as rollback_exc:  # pragma: no cover - the connection is broken
                _log.warning("store %s: rollback failed: %s", self._path, rollback_exc)
            if isinstance(exc, sqlite3.Error | UnicodeDecodeError):  # the latter: damaged text in the file
                raise self._unavailable(what, exc) from exc
            raise

    async def get(self, source: str, job_run_id: int) -> _svc.RunUpdate | None:
        """The latest update of one run, or ``None``."""
        if not _INT64_MIN <= job_run_id <= _INT64_MAX:
            return None

        def read(conn: sqlite3.Connection) -> _svc.RunUpdate | None:
            row = conn.execute(
                "SELECT revision, accepted_usecs, run, job FROM runs WHERE source = ? AND job_run_id = ?",
                (source, job_run_id),
            ).fetchone()
            return _decode(source, *row) if row is not None else None

        return await self._read(read)

    async def list_runs(
        self, flt: _svc.RunFilter | None, after: tuple[str, int] | None, limit: int
    ) -> list[_svc.RunUpdate]:
        """Latest updates of matching runs ordered by (source, job_run_id), after ``after``."""
        if limit <= 0:
            return []
        matches = compile_filter(flt)
        where, params = _filter_sql(flt)
        if after is not None:
            source, job_run_id = after
            if job_run_id < _INT64_MIN:
                where += " AND source >= ?"
                params.append(source)
            else:
                where += " AND (source > ? OR (source = ? AND job_run_id > ?))"
                params.extend((source, source, _clamp64(job_run_id)))
        # Only constant SQL and "?" placeholders are joined here; the values are parameters.
        sql = (
            "SELECT source, revision, accepted_usecs, run, job FROM runs WHERE 1"  # noqa: S608
            + where
            + " ORDER BY source, job_run_id"
        )

        def read(conn: sqlite3.Connection) -> list[_svc.RunUpdate]:
            out: list[_svc.RunUpdate] = []
            cursor = conn.execute(sql, params)  # fetched lazily: stops at the limit
            try:
                for row in cursor:
                    update = _decode(*row)
                    if matches(update):
                        out.append(update)
                        if len(out) >= limit:
                            break
            finally:
                cursor.close()
            return out

        return await self._read(read)

    async def history(self, start_revision: int, end_revision: int, limit: int) -> list[_svc.RunUpdate]:
        """Updates in ``[start_revision, end_revision]``, ascending, at most ``limit``."""
        return await self._history(start_revision, end_revision, limit, lambda row: _decode(*row))

    async def history_wire(self, start_revision: int, end_revision: int, limit: int) -> list[tuple[int, bytes]]:
        """As :meth:`history`, as the stored serialized updates: nothing is decoded.

        A catch-up reads the history in consecutive calls, so each call that
        returns a full chunk starts reading the next one (up to
        :data:`_READ_AHEAD` rows or about :data:`_AHEAD_BYTES`) on the
        reader's thread while the caller sends this one; the next call with
        the same end picks it up. Rows are passed on as SQLite
        returns them, ``(revision, wire)`` tuples.
        """
        if limit <= 0 or end_revision < start_revision:
            return []
        ahead = self._ahead.pop((start_revision, end_revision), None)
        if ahead is not None:
            rows = await ahead
        else:
            rows = await self._history_rows(start_revision, end_revision, limit)
        if len(rows) > limit:
            rest, rows = rows[limit:], rows[:limit]
            self._keep_ahead(rows[-1][0] + 1, end_revision, self._ready(rest))
        elif len(rows) == limit and rows[-1][0] < end_revision and not self._closing:
            following = rows[-1][0] + 1
            job = asyncio.ensure_future(self._history_rows(following, end_revision, _ahead_rows(rows, limit)))
            self._keep_ahead(following, end_revision, job)
        return rows

    @staticmethod
    def _ready(rows: list[tuple[int, bytes]]) -> asyncio.Future[list[tuple[int, bytes]]]:
        done: asyncio.Future[list[tuple[int, bytes]]] = asyncio.get_running_loop().create_future()
        done.set_result(rows)
        return done

    def _keep_ahead(self, start: int, end: int, rows: asyncio.Future[list[tuple[int, bytes]]]) -> None:
        """Remember rows read ahead for the call that starts at ``start``; the oldest go beyond a few catch-ups."""
        rows.add_done_callback(_retrieve)  # a read ahead nobody asks for must not log "never retrieved"
        self._ahead[(start, end)] = rows
        while len(self._ahead) > _MAX_AHEAD:
            self._ahead.pop(next(iter(self._ahead))).cancel()

    async def _history_rows(self, start_revision: int, end_revision: int, limit: int) -> list[tuple[int, bytes]]:
        """``(revision, wire)`` rows; rows written by schema version 1 (no ``wire``) are encoded here."""
        rows: list[tuple[int, bytes | None]] = await self._history(
            start_revision, end_revision, limit, None, columns="revision, wire"
        )
        if start_revision > self._legacy_end or all(data is not None for _, data in rows):
            return rows  # type: ignore[return-value]
        updates = {u.revision: u for u in await self.history(start_revision, end_revision, limit)}
        return [
            (revision, data if data is not None else updates[revision].SerializeToString()) for revision, data in rows
        ]

    async def _history(
        self,
        start_revision: int,
        end_revision: int,
        limit: int,
        convert: Callable[[tuple[Any, ...]], _T] | None,
        columns: str = "source, revision, accepted_usecs, run, job",
    ) -> list[_T]:
        max_age = self._retention.max_age_seconds

        def read(conn: sqlite3.Connection) -> tuple[int, int | None, list[_T]]:
            (oldest,) = conn.execute("SELECT value FROM meta WHERE key = 'oldest'").fetchone()
            first_accepted: int | None = None
            if max_age:
                row = conn.execute("SELECT accepted_usecs FROM updates ORDER BY revision LIMIT 1").fetchone()
                first_accepted = row[0] if row is not None else None
            if start_revision < oldest or limit <= 0 or end_revision < start_revision:
                return oldest, first_accepted, []
            rows = conn.execute(
                f"SELECT {columns} FROM updates WHERE revision >= ? AND revision <= ? ORDER BY revision LIMIT ?",  # noqa: S608 - our own column list
                (_clamp64(start_revision), _clamp64(end_revision), limit),
            ).fetchall()
            return oldest, first_accepted, rows if convert is None else [convert(row) for row in rows]

        oldest, first_accepted, updates = await self._read(read)
        expired = first_accepted is not None and first_accepted < now_usecs() - int(max_age * 1_000_000)
        if expired and not self._closing:
            # Updates expired while nothing was written: trim now, then read again.
            await self._on(self._writer, self._trim_now)
            oldest, _, updates = await self._read(read)
        if start_revision < oldest:
            raise HistoryExpired(start_revision, oldest)
        return updates

    async def snapshot(self, flt: _svc.RunFilter | None) -> tuple[list[_svc.RunUpdate], int]:
        """Latest update of every matching run, in revision order, and the head they are consistent with.

        Read in one transaction. The head may be ahead of :meth:`head_revision`
        for a moment (committed, listeners not called yet): a watch should skip
        listener updates whose revision is not above the returned head.
        """
        matches = compile_filter(flt)
        where, params = _filter_sql(flt)
        sql = "SELECT source, revision, accepted_usecs, run, job FROM runs WHERE 1" + where + " ORDER BY revision"  # noqa: S608

        def read(conn: sqlite3.Connection) -> tuple[list[_svc.RunUpdate], int]:
            (head,) = conn.execute("SELECT value FROM meta WHERE key = 'head'").fetchone()
            updates = [_decode(*row) for row in conn.execute(sql, params)]
            return [update for update in updates if matches(update)], int(head)

        return await self._read(read)

    def head_revision(self) -> int:
        """The newest committed revision (updated on the event loop, just before its listeners run)."""
        return self._head


def _write(conn: sqlite3.Connection, statement: str, *parameters: object) -> None:
    """``statement`` in a write transaction of its own; rolled back if it fails."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(statement, parameters)
        conn.execute("COMMIT")
    except sqlite3.Error:
        if conn.in_transaction:
            conn.rollback()
        raise
