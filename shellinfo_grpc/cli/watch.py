"""``shellinfo watch``: follow run updates live, resuming by itself across disconnects.

A thread iterates the watch (:class:`shellinfo_grpc.client.RunWatch`) so that
the command's thread can wait with a timeout; a view shows what arrives (JSON
lines, appended table rows, or a table redrawn in place on a terminal) and
notices say when the connection is lost and when the watch resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import select
import shutil
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from shellinfo_grpc.cli._io import EXIT_OK, PROG, Streams, Subparsers, command, count, jsonl, one_line, whole
from shellinfo_grpc.cli._table import COLUMNS, cells, clip, describe, row, table, unshowable, update_dict
from shellinfo_grpc.cli.calls import Match, add_client_options, add_filters, add_table_format, connect, filter_options
from shellinfo_grpc.errors import (
    ConfigurationError,
)
from shellinfo_grpc.framing import write_all

if TYPE_CHECKING:
    from shellinfo_grpc._gen.shellinfo.v1.run_update_service_pb2 import RunUpdate
    from shellinfo_grpc.client import RunWatch, WatchEvent

__all__ = ["add_watch"]


_END: Final = object()


class _Pump:
    """Iterates a watch on a thread, so that the command's thread can wait with a timeout.

    Each update goes out as ``(event, reconnects)``: the watch's reconnect
    count when it was delivered, so that notices say when it resumed. The
    watch's end is ``_END``; its error, the exception.
    """

    def __init__(self, watch: RunWatch) -> None:
        self._watch = watch
        self._closed = threading.Event()
        self.items: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self._thread = threading.Thread(target=self._run, name="shellinfo-watch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._closed.is_set():
            try:
                self.items.put(item, timeout=0.1)
            except queue.Full:
                continue
            return True
        return False

    def _run(self) -> None:
        try:
            for event in self._watch:
                if not self._put((event, self._watch.reconnects)):
                    return
        except BaseException as exc:  # handed to the command's thread
            self._put(exc)
        else:
            self._put(_END)

    def close(self) -> None:
        self._closed.set()
        self._watch.close()
        self._thread.join(2.0)


class _View(Protocol):
    """How watch shows what it receives."""

    live: bool

    def event(self, event: WatchEvent) -> None: ...

    def idle(self) -> None:
        """Nothing more is at hand: show what was received."""

    def notice(self, text: str | None) -> None:
        """A notice about the connection (``None``: the last one is over)."""

    def skipped(self, text: str) -> None:
        """An update that cannot be shown was skipped; ``text`` says which and why."""

    def close(self) -> None: ...


class _JsonlView:
    """One JSON line per update, and one for the end of the snapshot."""

    live = False

    def __init__(self, io: Streams) -> None:
        self._io = io

    def event(self, event: WatchEvent) -> None:
        if event.update is None:
            line = jsonl({"snapshotComplete": True, "revision": event.revision})
        else:
            line = jsonl(update_dict(event.update))
        write_all(self._io.stdout, line)

    def idle(self) -> None:
        self._io.stdout.flush()

    def notice(self, text: str | None) -> None:
        if text is not None:
            self._io.report(text)

    def skipped(self, text: str) -> None:
        self._io.report(f"{PROG} watch: {text}")

    def close(self) -> None:
        self.idle()


class _RowsView(_JsonlView):
    """A header, then one table row per update, appended."""

    _WIDTHS: Final = [column.width for column in COLUMNS]

    def __init__(self, io: Streams) -> None:
        super().__init__(io)
        self._write(row([c.title for c in COLUMNS], self._WIDTHS))
        self.idle()

    def _write(self, line: str) -> None:
        write_all(self._io.stdout, (line + "\n").encode())

    def event(self, event: WatchEvent) -> None:
        if event.update is None:
            self._write(f"-- snapshot complete at revision {event.revision}; live updates follow --")
        else:
            self._write(row(cells(event.update), self._WIDTHS))


class _LiveView:
    """A table redrawn in place on a terminal: the latest state of each run, most recently updated first."""

    live = True
    _INTERVAL: Final = 0.1  # seconds between redraws while updates pour in

    def __init__(self, io: Streams, address: str) -> None:
        self._out = io.stdout
        self._address = address
        self._runs: dict[tuple[str, int | None], RunUpdate] = {}
        self._updates = 0
        self._revision: int | None = None
        self._snapshot = ""
        self._notice: str | None = None
        self._skipped = 0
        self._drawn = 0.0
        self._dirty = True
        self._size = shutil.get_terminal_size()
        write_all(self._out, b"\x1b[?25l\x1b[2J")  # hide the cursor, clear the screen
        self._draw()

    def event(self, event: WatchEvent) -> None:
        self._revision = event.revision
        if event.update is None:
            self._snapshot = "snapshot complete"
        else:
            run = event.update.run
            self._runs[(event.update.source, run.job_run_id if run.HasField("job_run_id") else None)] = event.update
            self._updates += 1
        self._dirty = True
        if time.monotonic() - self._drawn >= self._INTERVAL:
            self._draw()

    def idle(self) -> None:
        if self._dirty or shutil.get_terminal_size() != self._size:
            self._draw()

    def notice(self, text: str | None) -> None:
        self._notice = text
        self._dirty = True

    def skipped(self, text: str) -> None:
        # Standard error shares the screen: count them in the status line instead.
        self._skipped += 1
        self._dirty = True

    def _draw(self) -> None:
        self._size = shutil.get_terminal_size()
        columns, lines = self._size
        latest = sorted(self._runs.values(), key=lambda u: u.revision, reverse=True)
        room = max(lines - 3, 0)  # the status line, the header, and the line the cursor rests on
        rows = [cells(update) for update in latest[:room]]
        revision = "-" if self._revision is None else str(self._revision)
        status = f"{PROG} watch {self._address}  revision {revision}  {len(self._runs)} runs  {self._updates} updates"
        if self._snapshot:
            status += f"  ({self._snapshot})"
        if len(latest) > room:
            status += f"  [{len(latest) - room} more not shown]"
        if self._skipped:
            status += f"  [{self._skipped} not shown: not valid REST]"
        if self._notice:
            status += f"  [{self._notice}]"
        screen = [clip(status, columns), *(clip(line, columns) for line in table(rows))]
        write_all(self._out, ("\x1b[H" + "\x1b[K\n".join(screen) + "\x1b[K\x1b[J").encode())
        self._out.flush()
        self._drawn = time.monotonic()
        self._dirty = False

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._draw()
            write_all(self._out, b"\n\x1b[?25h")  # show the cursor again
            self._out.flush()


class _Notices:
    """Says when a watch loses its connection and when it resumes; a watch from now, where it starts.

    The watch says when it is connected again (:attr:`RunWatch.connected`: the
    server answers a resumed watch at once), so the resume is reported as soon
    as it happens, not when the next update arrives.
    """

    def __init__(self, watch: RunWatch, view: _View, *, from_now: bool, address: str) -> None:
        self._watch = watch
        self._view = view
        self._from_now = from_now
        self._address = address
        self._reconnects = 0
        self._outage: str | None = None  # the last error reported, while reconnecting
        self._resumed = False  # the live view shows "reconnected" until the next update

    def poll(self, first_update: int | None) -> None:
        """Check the watch for news (reconnects, where a watch from now starts)."""
        if self._from_now:
            start = self._watch.resume_revision
            if start is not None or first_update is not None:
                self._from_now = False
                if not self._view.live:
                    begin = first_update if first_update is not None else start
                    self._view.notice(f"{PROG} watch: watching {self._address} from revision {begin}")
        reconnects = self._watch.reconnects
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            error = self._watch.last_error
            text = one_line(str(error)) if error is not None else "the connection was lost"
            if text != self._outage:
                self._outage = text
                if self._view.live:  # the status line has room for the code and reason only
                    code = f"{error.code} {error.reason}".strip() if error is not None else "connection lost"
                    self._view.notice(f"reconnecting: {code}")
                else:
                    self._view.notice(f"{PROG} watch: {text}; reconnecting (nothing will be missed or repeated)")
        if self._outage is not None and self._watch.connected:
            self._outage = None
            resume = self._watch.resume_revision
            where = f" at revision {resume}" if resume is not None else ""
            if self._view.live:
                self._resumed = True
                self._view.notice(f"reconnected; resuming{where}")
            else:
                self._view.notice(f"{PROG} watch: reconnected; resuming{where}")

    def delivered(self) -> None:
        """An update came: a "reconnected" notice has said what it had to."""
        if self._resumed:
            self._resumed = False
            self._view.notice(None)


def _cmd_watch(args: argparse.Namespace, io: Streams) -> int:
    """Print run updates as the service accepts them; resume by itself, without missing or repeating an
    update, when the connection is lost or the server restarts (a notice goes to standard error). On
    a terminal, the table is redrawn in place: the latest state of each run, most recently updated
    first. An update stored before the service checked records, that cannot be shown in REST form,
    is skipped with one line on standard error (on a terminal, counted in the status line). Ctrl-C
    stops (exit status 130).
    """
    filters, match = filter_options(args, io)
    if args.snapshot and args.from_revision:
        raise ConfigurationError("--snapshot starts from now: it does not go with --from-revision")
    with connect(args) as client:
        watch = client.watch(**filters, start_revision=args.from_revision, include_snapshot=args.snapshot)
        pump = _Pump(watch)
        view: _View
        if args.format == "jsonl":
            view = _JsonlView(io)
        elif io.stdout.isatty():
            view = _LiveView(io, args.address)
        else:
            view = _RowsView(io)
        notices = _Notices(watch, view, from_now=not (args.from_revision or args.snapshot), address=args.address)
        try:
            return _follow(pump, notices, view, _Shown(args.count, match), _reader_gone(io.stdout))
        finally:
            pump.close()
            view.close()


def _reader_gone(stream: Any) -> Callable[[], bool]:
    """A check of whether the reader of a pipe on ``stream`` has gone (``watch ... | head -3``).

    A watch writes only when updates come; without this, one that waits for
    the next update would notice only then that nobody reads any more.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (tests' in-memory streams)
        return lambda: False
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
    return lambda: bool(poller.poll(0))


class _Shown:
    """Which updates the view shows (the filter the service cannot apply, and showable ones), and how many."""

    def __init__(self, count: int | None, match: Match) -> None:
        self.count = count
        self.match = match
        self.updates = 0
        self.first: int | None = None

    def take(self, event: WatchEvent, view: _View) -> bool:
        """Whether to show ``event``; a skipped one that cannot be shown is reported."""
        update = event.update
        if update is None:
            return True
        if self.match is not None and not self.match(update):
            return False
        problem = unshowable(update)
        if problem is not None:
            view.skipped(one_line(f"skipped {describe(update)}: cannot be shown as REST: {problem}"))
            return False
        self.updates += 1
        if self.first is None:
            self.first = event.revision
        return True

    @property
    def done(self) -> bool:
        return self.count is not None and self.updates >= self.count


def _follow(pump: _Pump, notices: _Notices, view: _View, shown: _Shown, gone: Callable[[], bool]) -> int:
    while True:
        notices.poll(shown.first)
        try:
            item = pump.items.get(timeout=0.1)
        except queue.Empty:
            view.idle()
            if gone():
                raise BrokenPipeError("standard output was closed") from None
            continue
        if item is _END:
            return EXIT_OK
        if isinstance(item, BaseException):
            raise item
        event, _ = item
        if shown.take(event, view):
            notices.delivered()
            view.event(event)
            if shown.done:
                return EXIT_OK
        if pump.items.empty():
            view.idle()


def add_watch(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    parser = command(subparsers, "watch", _cmd_watch, "follow run updates live")
    add_table_format(
        parser,
        "a table, or one JSON object per update: {revision, source, acceptedTimeUsecs, run} and"
        " {snapshotComplete, revision} after a snapshot (default table)",
    )
    parser.add_argument(
        "--from-revision",
        type=whole,
        default=0,
        metavar="N",
        help="start at revision N, inclusive: the history first, then live (default 0: from now)",
    )
    parser.add_argument(
        "--snapshot", action="store_true", help="first the latest state of every matching run, then live"
    )
    parser.add_argument(
        "--count",
        type=count,
        metavar="N",
        help="exit (status 0) after showing N updates (a stored run that cannot be shown does not count)",
    )
    add_filters(parser)
    add_client_options(parser)
