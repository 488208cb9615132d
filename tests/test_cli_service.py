"""End-to-end tests of the service commands: ``shellinfo serve``, ``publish``, ``watch``, ``get``, ``list``.

Every server is a real ``shellinfo serve`` process on ``127.0.0.1`` whose port
is read from the first line it writes to standard error; the client commands
run as the installed console script, as a user would run them. Pure argument
checks, which never reach a server, run in-process through ``main``. Every
wait is bounded, every server is killed at teardown, and no standard error
may ever show a traceback.

The durability test kills ``shellinfo serve`` with SIGKILL in the middle of a
burst of concurrent publishes, twice, restarts it on the same file and port,
and checks that every acknowledged update is there with its revision and that
a watcher that was watching throughout saw every update once, in order.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from certs import make_pki

from shellinfo_grpc.cli import main
from shellinfo_grpc.client import ReconnectPolicy, RunUpdateClient, WatchEvent
from shellinfo_grpc.errors import ServiceError

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

SCRIPT = Path(sys.executable).with_name("shellinfo")
WAIT = 20.0  # the longest any single wait may take, in seconds
SERVING = re.compile(r"shellinfo: serving on 127\.0\.0\.1:(\d+) \(store (.+)\)")

#: The environment of every process: none of the user's shellinfo or gRPC settings.
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SHELLINFO_", "GRPC_"))}

#: Client options for the tests' own clients: connections of their own, and
#: quick reconnects (gRPC backs off for up to 5 s by default). Not
#: grpc.min_reconnect_backoff_ms: it is also the connect timeout, which a busy
#: machine needs to be long.
FAST = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
)


# --- helpers --------------------------------------------------------------------------


class Lines:
    """Reads a pipe line by line on a thread, so that a test can wait for lines with a bound."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                with self._cond:
                    self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = WAIT) -> list[str]:
        """The first ``count`` lines, once there are that many."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.lines) >= count or self.closed, timeout):
                pytest.fail(f"waited {timeout} s for {count} lines; got {self.lines}")
            assert len(self.lines) >= count, f"the stream ended after {self.lines}"
            return self.lines[:count]

    def wait_for(self, pattern: str, timeout: float = WAIT) -> str:
        """The first line that contains ``pattern``, once there is one."""

        def found() -> str | None:
            return next((line for line in self.lines if pattern in line), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None or self.closed, timeout):
                pytest.fail(f"waited {timeout} s for a line with {pattern!r}; got {self.lines}")
            line = found()
            assert line is not None, f"the stream ended without {pattern!r}: {self.lines}"
            return line

    def text(self) -> str:
        self._thread.join(timeout=WAIT)
        with self._cond:
            return "\n".join(self.lines)


class Server:
    """A ``shellinfo serve`` process; ``port`` is the one it says it bound."""

    def __init__(self, store: str, port: int, args: tuple[str, ...], env: dict[str, str]) -> None:
        command = [str(SCRIPT), "serve", "--address", f"127.0.0.1:{port}", *args]
        if store:
            command += ["--store", store]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        self.err = Lines(self.proc.stderr)
        first = self.err.wait(1)[0]
        match = SERVING.fullmatch(first)
        assert match, f"the first line of serve is not the serving line: {first!r}"
        self.port = int(match[1])
        self.store = match[2]
        assert port in (0, self.port)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        """SIGTERM, and the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(WAIT)


ServeFactory = Callable[..., Server]


@pytest.fixture
def serve() -> Iterator[ServeFactory]:
    """Start ``shellinfo serve`` processes; every one is killed at teardown, and none may show a traceback."""
    servers: list[Server] = []

    def start(store: str = "memory://", *, port: int = 0, args: tuple[str, ...] = (), env: Any = None) -> Server:
        server = Server(store, port, args, env or ENV)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.kill()
    for server in servers:
        assert "Traceback" not in server.err.text(), server.err.text()


def cli(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run one command of the console script to its end; it must never show a traceback."""
    result = subprocess.run(
        [str(SCRIPT), *args], input=stdin, capture_output=True, timeout=60, env=env or ENV, check=False
    )
    assert b"Traceback" not in result.stderr, result.stderr.decode()
    return result


def watcher(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Lines, Lines]:
    """Start ``shellinfo watch``; its standard output and error are read as lines."""
    proc = subprocess.Popen(
        [str(SCRIPT), "watch", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env or ENV,
    )
    return proc, Lines(proc.stdout), Lines(proc.stderr)


@contextlib.contextmanager
def ending(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Kill a process at the end of the block if it still runs."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


def in_process(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """Run the command line in this process: exit status, standard output, standard error."""
    out, err = io.BytesIO(), io.StringIO()
    status = main(list(args), stdin=io.BytesIO(stdin), stdout=out, stderr=err)
    assert "Traceback" not in err.getvalue()
    return status, out.getvalue().decode(), err.getvalue()


def sqlite_url(path: Path) -> str:
    """``sqlite:///ABSOLUTE/PATH`` (the path brings its own leading slash)."""
    assert path.is_absolute()
    return f"sqlite://{path}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def client(address: str, **kwargs: Any) -> RunUpdateClient:
    return RunUpdateClient(address, timeout=WAIT, options=FAST, **kwargs)


def history(address: str, through: int) -> list[Any]:
    """Every update from revision 1 through ``through``, read with a watch."""
    updates = []
    if through == 0:
        return updates
    with client(address) as c, c.watch(start_revision=1, reconnect=ReconnectPolicy(max_attempts=0)) as watch:
        for event in watch:
            if event.update is not None:
                updates.append(event.update)
            if event.revision >= through:
                break
    return updates


def line(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The one line a failed command writes to standard error."""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- publish, get, list, watch ---------------------------------------------------------


def test_publish_get_list_and_watch_end_to_end(serve: ServeFactory, tmp_path: Path) -> None:
    server = serve(sqlite_url(tmp_path / "runs.sqlite3"))
    assert server.store == sqlite_url(tmp_path / "runs.sqlite3")
    at = ("--address", server.address)
    start, end = 1700000000000000, 1700000360000000

    # One argument: PublishRun.
    # Known REST keys in schema order, as to_rest writes them.
    a7 = {"jobRunId": 7, "startTimeUsecs": start, "runType": "kFull", "status": "kRunning"}
    result = cli("publish", *at, "--source", "a", json.dumps(a7))
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        b'jobRunId 7 (source "a"): revision 1, changed\n',
        b"",
    )

    # Several arguments: one PublishRuns stream.
    result = cli("publish", *at, "--source", "a", '{"jobRunId": 8, "status": "kAccepted"}', '{"jobRunId":9}')
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        'jobRunId 8 (source "a"): revision 2, changed',
        'jobRunId 9 (source "a"): revision 3, changed',
    ]

    # A JSON array on standard input, reported as JSON lines.
    b7 = {"jobRunId": 7, "startTimeUsecs": start, "endTimeUsecs": end, "runType": "kRegular", "status": "kSuccess"}
    b1 = {"jobRunId": 1, "status": "kFailure", "error": "disk full — ü"}
    result = cli("publish", *at, "--source", "b", "--format", "jsonl", stdin=json.dumps([b7, b1], indent=2).encode())
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        '{"record":1,"jobRunId":7,"revision":4,"changed":true}',
        '{"record":2,"jobRunId":1,"revision":5,"changed":true}',
    ]

    # JSON lines on standard input (a blank line skipped); an identical state records nothing.
    jsonl = f'{{"jobRunId": 8, "status": "kRunning"}}\n\n{json.dumps(a7)}\n'.encode()
    result = cli("publish", *at, "--source", "a", stdin=jsonl)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        'jobRunId 8 (source "a"): revision 6, changed',
        'jobRunId 7 (source "a"): revision 1, unchanged',
    ]

    # One pretty-printed object on standard input.
    result = cli("publish", *at, "--source", "c", stdin=b'{\n  "jobRunId": 10,\n  "status": "kOnHold"\n}\n')
    assert (result.returncode, result.stdout) == (0, b'jobRunId 10 (source "c"): revision 7, changed\n')

    updates = {u.revision: u for u in history(server.address, 7)}
    assert sorted(updates) == list(range(1, 8))
    accepted = {revision: u.accepted_time_usecs for revision, u in updates.items()}

    def as_json(revision: int, source: str, run: dict[str, Any]) -> dict[str, Any]:
        return {"revision": revision, "source": source, "acceptedTimeUsecs": accepted[revision], "run": run}

    # get: pretty JSON of the latest state.
    result = cli("get", *at, "7", "--source", "b")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == json.dumps(as_json(4, "b", b7), ensure_ascii=False, indent=2) + "\n"

    # list: every run, ordered by (source, jobRunId).
    latest = [
        as_json(1, "a", a7),
        as_json(6, "a", {"jobRunId": 8, "status": "kRunning"}),
        as_json(3, "a", {"jobRunId": 9}),
        as_json(5, "b", b1),
        as_json(4, "b", b7),
        as_json(7, "c", {"jobRunId": 10, "status": "kOnHold"}),
    ]
    result = cli("list", *at, "--format", "jsonl", "--page-size", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [line(value) for value in latest]
    result = cli("list", *at, "--format", "jsonl", "--status", "kRunning", "--status", "kSuccess", "--source", "a")
    assert result.stdout.decode().splitlines() == [line(latest[0]), line(latest[1])]

    result = cli("list", *at)
    assert result.returncode == 0, result.stderr
    rows = result.stdout.decode().splitlines()
    assert (
        rows[0]
        == "REVISION  SOURCE  JOB  JOB RUN ID  RUN TYPE  STATUS    START                 END                   ERROR"
    )
    assert rows[1:] == [
        "       1  a       -             7  kFull     kRunning  2023-11-14T22:13:20Z  -",
        "       6  a       -             8  -         kRunning  -                     -",
        "       3  a       -             9  -         -         -                     -",
        "       5  b       -             1  -         kFailure  -                     - "
        "                    disk full — ü",
        "       4  b       -             7  kRegular  kSuccess  2023-11-14T22:13:20Z  2023-11-14T22:19:20Z",
        "       7  c       -            10  -         kOnHold   -                     -",
    ]

    # watch: the history from revision 1, as JSON lines, then exit after --count updates.
    every = [
        as_json(1, "a", a7),
        as_json(2, "a", {"jobRunId": 8, "status": "kAccepted"}),
        as_json(3, "a", {"jobRunId": 9}),
        as_json(4, "b", b7),
        as_json(5, "b", b1),
        as_json(6, "a", {"jobRunId": 8, "status": "kRunning"}),
        as_json(7, "c", {"jobRunId": 10, "status": "kOnHold"}),
    ]
    result = cli("watch", *at, "--format", "jsonl", "--from-revision", "1", "--count", "7")
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.decode().splitlines() == [line(value) for value in every]
    result = cli("watch", *at, "--format", "jsonl", "--from-revision", "3", "--count", "2", "--source", "b")
    assert result.stdout.decode().splitlines() == [line(every[3]), line(every[4])]
    result = cli("watch", *at, "--format", "jsonl", "--from-revision", "1", "--count", "1", "--run-type", "kRegular")
    assert result.stdout.decode().splitlines() == [line(every[3])]

    # watch as a table (standard output is not a terminal): a header, then rows appended.
    result = cli("watch", *at, "--from-revision", "4", "--count", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        "REVISION  SOURCE        JOB           JOB RUN ID  RUN TYPE  STATUS       START "
        "                END                   ERROR",
        "       4  b             -                      7  kRegular  kSuccess     2023-1"
        "1-14T22:13:20Z  2023-11-14T22:19:20Z",
        "       5  b             -                      1  -         kFailure     -     "
        "                -                     disk"
        " full — ü",
    ]

    # watch --snapshot: the latest state of each matching run, the marker, then live updates.
    proc, out, err = watcher(*at, "--format", "jsonl", "--snapshot", "--job-run-id", "10", "--count", "2")
    with ending(proc):
        assert out.wait(2) == [line(latest[5]), '{"snapshotComplete":true,"revision":7}']
        result = cli("publish", *at, "--source", "c", '{"jobRunId": 10, "status": "kSuccess"}')
        assert result.returncode == 0, result.stderr
        assert proc.wait(WAIT) == 0
        live = json.loads(out.wait(3)[2])
        assert (live["revision"], live["source"], live["run"]) == (8, "c", {"jobRunId": 10, "status": "kSuccess"})
        assert err.text() == ""


def test_jobs_publish_from_run_instances_and_show_in_list_and_watch(serve: ServeFactory) -> None:
    """publish takes ProtectionRunInstance objects (run and job); list and watch show the job and filter by it."""
    server = serve()
    at = ("--address", server.address)
    job = {"jobId": 7, "jobName": "vm-daily", "jobUid": {"clusterId": 1, "clusterIncarnationId": 2, "id": 7}}
    instance = {**job, "protectionShellInfo": {"jobRunId": 1, "status": "kRunning"}, "backupRun": {"x": 1}}
    bare = {"jobRunId": 2, "status": "kRunning"}
    result = cli("publish", *at, "--source", "c1", stdin=json.dumps([instance, bare]).encode())
    assert result.returncode == 0, result.stderr
    # Later a bare run of job 7 again: it keeps its job.
    result = cli("publish", *at, "--source", "c1", '{"jobRunId": 1, "status": "kSuccess"}')
    assert result.returncode == 0, result.stderr

    result = cli("list", *at, "--format", "jsonl", "--job-id", "7")
    (only,) = [json.loads(text) for text in result.stdout.decode().splitlines()]
    assert (only["revision"], only["run"], only["job"]) == (3, {"jobRunId": 1, "status": "kSuccess"}, job)
    result = cli("list", *at, "--format", "jsonl")
    assert ["job" in json.loads(text) for text in result.stdout.decode().splitlines()] == [True, False]
    rows = cli("list", *at).stdout.decode().splitlines()
    assert rows[0].split()[:4] == ["REVISION", "SOURCE", "JOB", "JOB"]
    assert [row.split()[:4] for row in rows[1:]] == [["3", "c1", "vm-daily", "1"], ["2", "c1", "-", "2"]]

    result = cli("watch", *at, "--format", "jsonl", "--from-revision", "1", "--count", "2", "--job-id", "7")
    assert result.returncode == 0, result.stderr
    watched = [json.loads(text) for text in result.stdout.decode().splitlines()]
    assert [(w["revision"], w["job"]) for w in watched] == [(1, job), (3, job)]
    result = cli("watch", *at, "--from-revision", "1", "--count", "1", "--job-id", "7")
    assert "vm-daily" in result.stdout.decode().splitlines()[1]

    # A bad job key is named, and nothing is published; a bad --job-id is a usage error.
    bad = {"jobId": "seven", "protectionShellInfo": {"jobRunId": 5}}
    result = cli("publish", *at, json.dumps(bad))
    assert result.returncode == 2
    assert "jobId" in result.stderr.decode()
    assert cli("list", *at, "--job-id", "seven").returncode == 2
    assert len(history(server.address, 3)) == 3


def test_serve_metrics_address_serves_prometheus_metrics(serve: ServeFactory) -> None:
    server = serve(args=("--metrics-address", "127.0.0.1:0"))
    found = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", server.err.wait(2)[1])
    assert found, server.err.lines
    at = ("--address", server.address)
    assert cli("publish", *at, '{"jobRunId": 1, "status": "kSuccess"}').returncode == 0
    assert cli("publish", *at, '{"jobRunId": 1, "status": "kRunning"}').returncode == 1
    with urllib.request.urlopen(found[1], timeout=WAIT) as answer:  # loopback
        text = answer.read().decode()
    assert 'shellinfo_service_publishes_total{outcome="changed"} 1.0' in text
    assert 'shellinfo_service_publishes_total{outcome="refused"} 1.0' in text
    assert "shellinfo_service_head_revision 1.0" in text
    assert "shellinfo_service_watchers 0.0" in text
    assert "shellinfo_service_store_commit_seconds_count 2.0" in text
    result = cli("serve", "--address", "127.0.0.1:0", "--metrics-address", "nowhere", "--store", "memory://")
    assert result.returncode == 2
    assert "--metrics-address" in one_line(result)


def test_three_terminals(serve: ServeFactory) -> None:
    """The README's quickstart: serve; watch (from now); publish three times."""
    server = serve()
    at = ("--address", server.address)
    proc, out, err = watcher(*at, "--format", "jsonl", "--count", "3")
    with ending(proc):
        # A watch from now says where it starts once the server has answered: from then on it misses nothing.
        assert err.wait_for("watching") == f"shellinfo watch: watching {server.address} from revision 1"
        for number, status in enumerate(("kRunning", "kRunning", "kSuccess")):
            run = json.dumps({"jobRunId": 7 + (number == 1), "status": status})
            assert cli("publish", *at, "--source", "cluster-a", run).returncode == 0
        assert proc.wait(WAIT) == 0
        lines = [json.loads(text) for text in out.wait(3)]
        assert [(u["revision"], u["source"], u["run"]) for u in lines] == [
            (1, "cluster-a", {"jobRunId": 7, "status": "kRunning"}),
            (2, "cluster-a", {"jobRunId": 8, "status": "kRunning"}),
            (3, "cluster-a", {"jobRunId": 7, "status": "kSuccess"}),
        ]
        assert err.text().splitlines() == [f"shellinfo watch: watching {server.address} from revision 1"]


def test_live_table_on_a_terminal(serve: ServeFactory) -> None:
    """On a terminal, watch redraws one row per run in place, most recently updated first."""
    server = serve()
    with client(server.address) as c:
        for job in (1, 2, 3):
            c.publish({"jobRunId": job, "status": "kRunning"}, source="a")
        c.publish({"jobRunId": 1, "status": "kSuccess"}, source="a")
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 5, 100, 0, 0))  # 5 lines, 100 columns
    proc = subprocess.Popen(
        [str(SCRIPT), "watch", "--address", server.address, "--from-revision", "1", "--count", "4"],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    os.close(terminal)
    screen = b""
    with ending(proc):
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # the terminal closed: the watch exited
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(WAIT) == 0
    os.close(controller)
    assert proc.stderr is not None
    with proc.stderr:
        assert proc.stderr.read() == b""
    text = screen.decode()
    assert text.startswith("\x1b[?25l\x1b[2J\x1b[H")  # cursor hidden, screen cleared
    assert text.endswith("\x1b[?25h")  # and the cursor shown again
    last = text.rpartition("\x1b[H")[2].replace("\x1b[K", "").replace("\x1b[J", "")
    lines = [row.rstrip() for row in last.replace("\r", "").split("\n") if row.strip() and "\x1b" not in row]
    assert lines[0] == f"shellinfo watch {server.address}  revision 4  3 runs  4 updates  [1 more not shown]"
    assert lines[1].startswith("REVISION  SOURCE  JOB  JOB RUN ID  RUN TYPE  STATUS")
    # Five lines: the status line, the header, two rows (the latest first; run 1 once, in its final
    # state) and the line the cursor rests on.
    assert [row.split()[:6] for row in lines[2:]] == [
        ["4", "a", "-", "1", "-", "kSuccess"],
        ["3", "a", "-", "3", "-", "kRunning"],
    ]


# --- durability through the real server ------------------------------------------------


class Burst:
    """Concurrent publishers, streaming and unary, that record every acknowledged update."""

    STREAMS = 3
    UNARY = 3

    def __init__(self, address: str, round_: int) -> None:
        self.address = address
        self.acks: list[tuple[str, int, int, int]] = []  # (source, jobRunId, startTimeUsecs, revision)
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._guard, args=(self._stream, f"s{round_}.{n}"), daemon=True)
            for n in range(self.STREAMS)
        ] + [
            threading.Thread(target=self._guard, args=(self._unary, f"u{round_}.{n}"), daemon=True)
            for n in range(self.UNARY)
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def run(number: int) -> dict[str, Any]:
        # A new start time each time: every publish changes its run.
        return {"jobRunId": number % 25, "status": "kRunning", "startTimeUsecs": number}

    def _ack(self, source: str, number: int, result: Any) -> None:
        assert not isinstance(result, ServiceError), result
        assert result.changed
        with self._lock:
            self.acks.append((source, number % 25, number, result.revision))

    def _guard(self, publish: Callable[[RunUpdateClient, str], None], source: str) -> None:
        try:
            with client(self.address) as c:
                publish(c, source)
        except ServiceError:
            pass  # the server was killed: what was acknowledged is recorded
        except BaseException as exc:
            self.failures.append(exc)

    def _unary(self, c: RunUpdateClient, source: str) -> None:
        number = 0
        while not self.stop.is_set():
            number += 1
            self._ack(source, number, c.publish(self.run(number), source=source))

    def _stream(self, c: RunUpdateClient, source: str) -> None:
        def items() -> Iterator[dict[str, Any]]:
            number = 0
            while not self.stop.is_set():
                number += 1
                yield self.run(number)

        for number, result in enumerate(c.publish_many(items(), source=source), start=1):
            self._ack(source, number, result)

    def count(self) -> int:
        with self._lock:
            return len(self.acks)

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(WAIT)
            assert not thread.is_alive(), "a publisher did not stop"
        assert not self.failures, self.failures


class Collector:
    """Iterates a watch on a thread and keeps every event."""

    def __init__(self, watch: Any) -> None:
        self.watch = watch
        self.events: list[WatchEvent] = []
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        try:
            for event in self.watch:
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
        except BaseException as exc:
            with self._cond:
                self.error = exc
                self._cond.notify_all()

    def wait_until(self, revision: int) -> list[WatchEvent]:
        with self._cond:
            reached = self._cond.wait_for(
                lambda: self.error is not None or (self.events and self.events[-1].revision >= revision), WAIT
            )
            assert self.error is None, self.error
            assert reached, f"the watch reached {self.events[-1].revision if self.events else 0}, not {revision}"
            return list(self.events)

    def close(self) -> None:
        self.watch.close()
        self._thread.join(WAIT)


@pytest.mark.slow
def test_sigkill_mid_burst_loses_no_acknowledged_update(serve: ServeFactory, tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    port = free_port()
    store = sqlite_url(tmp_path / "runs.sqlite3")
    server = serve(store, port=port)
    address = server.address
    acks: list[tuple[str, int, int, int]] = []
    fast = ReconnectPolicy(initial_delay=0.05, max_delay=0.2, timeout=WAIT)
    with client(address) as watching:
        collector = Collector(watching.watch(start_revision=1, progress_interval_ms=100, reconnect=fast))
        try:
            for round_ in range(2):
                burst = Burst(address, round_)
                threshold = rng.randint(200, 500)
                deadline = time.monotonic() + WAIT
                while burst.count() < threshold:
                    assert time.monotonic() < deadline, f"only {burst.count()} acknowledgements (seed {seed})"
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, 0.03))
                server.kill()  # SIGKILL, mid-burst
                burst.join()
                acks += burst.acks
                assert burst.count() >= threshold

                server = serve(store, port=port)  # the same file, the same port
                with client(address) as reader:
                    latest = list(reader.list(page_size=1000))
                head = max(u.revision for u in latest)
                stored = history(address, head)

                # (a) every acknowledged update is stored, with the revision it was acknowledged with
                assert [u.revision for u in stored] == list(range(1, head + 1)), f"seed {seed}"
                by_revision = {u.revision: (u.source, u.run.job_run_id, u.run.start_time_usecs) for u in stored}
                lost = [ack for ack in acks if by_revision.get(ack[3]) != ack[:3]]
                assert not lost, f"{len(lost)} of {len(acks)} acknowledged updates lost, e.g. {lost[:3]} (seed {seed})"
                assert max(ack[3] for ack in acks) <= head
                # ... and the latest state of each run is its newest update
                newest: dict[tuple[str, int], int] = {}
                for u in stored:
                    newest[(u.source, u.run.job_run_id)] = u.revision
                assert {(u.source, u.run.job_run_id): u.revision for u in latest} == newest

                # (b) the watcher, watching through the kill, saw every update once, in order, without a gap
                events = collector.wait_until(head)
                assert all(event.update is not None for event in events)
                assert [event.revision for event in events] == list(range(1, head + 1)), f"seed {seed}"
                assert [e.update.SerializeToString(deterministic=True) for e in events if e.update] == [
                    u.SerializeToString(deterministic=True) for u in stored
                ]
                assert collector.watch.reconnects >= 1
        finally:
            collector.close()
    assert server.stop() == 0


# --- shutdown -----------------------------------------------------------------------------


def test_sigterm_shuts_down_gracefully_and_the_watcher_resumes(serve: ServeFactory, tmp_path: Path) -> None:
    port = free_port()
    store = sqlite_url(tmp_path / "runs.sqlite3")
    server = serve(store, port=port)
    at = ("--address", server.address)
    with client(server.address) as c:
        c.publish({"jobRunId": 1, "status": "kRunning"}, source="a")
        c.publish({"jobRunId": 2, "status": "kRunning"}, source="a")
    proc, out, err = watcher(*at, "--format", "jsonl", "--from-revision", "1", "--count", "3")
    with ending(proc):
        assert [json.loads(text)["revision"] for text in out.wait(2)] == [1, 2]

        began = time.monotonic()
        assert server.stop() == 0  # SIGTERM: the watcher is ended, the store closed, exit 0
        assert time.monotonic() - began < 8.0  # well within the 10 s grace
        serving, stopping, stopped = server.err.text().splitlines()  # one line each, at the default level info
        assert serving == f"shellinfo: serving on {server.address} (store {store})"
        assert stopping.startswith("shellinfo: info: server: stopping (received SIGTERM): ")
        assert "1 watcher to end" in stopping
        assert stopped == "shellinfo: info: server: stopped (received SIGTERM)"
        notice = err.wait_for("reconnecting")
        assert notice.startswith("shellinfo watch: UNAVAILABLE: ")
        assert notice.endswith("; reconnecting (nothing will be missed or repeated)")

        serve(store, port=port)
        # Said as soon as the watch is back, before any update arrives.
        assert err.wait_for("reconnected") == "shellinfo watch: reconnected; resuming at revision 3"
        assert len(out.lines) == 2
        assert cli("publish", *at, "--source", "a", '{"jobRunId": 1, "status": "kSuccess"}').returncode == 0
        assert proc.wait(WAIT) == 0
        third = json.loads(out.wait(3)[2])
        assert (third["revision"], third["run"]) == (3, {"jobRunId": 1, "status": "kSuccess"})


def test_watch_started_before_the_server_waits_for_it_and_ctrl_c_exits_130(serve: ServeFactory) -> None:
    port = free_port()
    proc, out, err = watcher("--address", f"127.0.0.1:{port}", "--format", "jsonl")
    with ending(proc):
        notice = err.wait_for("reconnecting")
        assert notice.startswith("shellinfo watch: UNAVAILABLE: "), notice
        server = serve(port=port)
        # The channel retries a refused connection with backoff: allow for it.
        assert err.wait_for("watching", timeout=WAIT) == f"shellinfo watch: watching {server.address} from revision 1"
        assert cli("publish", "--address", server.address, '{"jobRunId": 3}').returncode == 0
        assert json.loads(out.wait(1)[0])["run"] == {"jobRunId": 3}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT) == 130
        lines = err.text().splitlines()
        assert len(lines) == 3, lines  # the outage, where it started, and when updates resumed: no traceback
        assert lines[2] == "shellinfo watch: reconnected; resuming at revision 1"


def test_watch_exits_141_when_its_reader_goes_away(serve: ServeFactory) -> None:
    server = serve()
    assert cli("publish", "--address", server.address, '{"jobRunId": 1}').returncode == 0
    proc = subprocess.Popen(
        [str(SCRIPT), "watch", "--address", server.address, "--format", "jsonl", "--from-revision", "1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    with ending(proc):
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["revision"] == 1
        proc.stdout.close()  # as `head -1` does; no update comes after it
        assert proc.wait(WAIT) == 141
        assert proc.stderr is not None
        with proc.stderr:
            assert proc.stderr.read() == b""


# --- security -----------------------------------------------------------------------------


def test_bearer_tokens(serve: ServeFactory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# agents\ns3cret\n\nother-token\n")
    server = serve(args=("--token-file", str(tokens)))
    at = ("--address", server.address)
    run = '{"jobRunId": 1, "status": "kRunning"}'

    assert cli("publish", *at, "--token", "s3cret", run).returncode == 0
    result = cli("get", *at, "1", env={**ENV, "SHELLINFO_TOKEN": "other-token"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["run"] == {"jobRunId": 1, "status": "kRunning"}
    result = cli(
        "list", "--format", "jsonl", env={**ENV, "SHELLINFO_TOKEN": "s3cret", "SHELLINFO_ADDRESS": server.address}
    )
    assert (result.returncode, len(result.stdout.splitlines())) == (0, 1)

    wrong_env = {**ENV, "SHELLINFO_TOKEN": "wrong"}
    for command, args, env in [
        (("publish", run), ("--token", "wrong"), None),
        (("publish", run, run), ("--token", "wrong"), None),
        (("get", "1"), (), wrong_env),
        (("list",), (), None),
    ]:
        result = cli(command[0], *at, *args, *command[1:], env=env)
        assert (result.returncode, result.stdout) == (1, b""), (command, args, result.stderr)
        message = one_line(result)
        assert message.startswith("shellinfo: UNAUTHENTICATED: a valid bearer token is required"), message
    proc, _, err = watcher(*at, "--token", "wrong")
    with ending(proc):
        assert proc.wait(WAIT) == 1
        assert err.text().startswith("shellinfo: UNAUTHENTICATED: ")


def test_mutual_tls(serve: ServeFactory, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server = serve(
        args=(
            "--tls-cert",
            str(pki.server.cert),
            "--tls-key",
            str(pki.server.key),
            "--tls-client-ca",
            str(pki.ca.cert),
        )
    )
    at = ("--address", server.address, "--tls-ca", str(pki.ca.cert))
    me = ("--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key))
    result = cli("publish", *at, *me, "--source", "a", '{"jobRunId": 1, "status": "kRunning"}')
    assert result.returncode == 0, result.stderr
    result = cli("get", *at, *me, "1", "--source", "a")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["revision"] == 1

    rogue = ("--tls-cert", str(pki.rogue_client.cert), "--tls-key", str(pki.rogue_client.key))
    for who in ((), rogue):
        result = cli("get", *at, *who, "1", "--source", "a")
        assert (result.returncode, result.stdout) == (1, b""), result.stderr
        assert one_line(result).startswith("shellinfo: UNAVAILABLE: ")
    # Plaintext to a TLS server fails the same way.
    result = cli("get", "--address", server.address, "1")
    assert result.returncode == 1
    assert one_line(result).startswith("shellinfo: UNAVAILABLE: ")


# --- errors -------------------------------------------------------------------------------


def test_bad_records_publish_nothing(serve: ServeFactory) -> None:
    server = serve()
    at = ("--address", server.address)
    result = cli("publish", *at, '{"jobRunId": 1}', '{"jobRunId": 2,', '{"jobRunId": "3"}', "[1]")
    assert (result.returncode, result.stdout) == (2, b"")
    lines = result.stderr.decode().splitlines()
    assert lines[0].startswith("record 2: not valid JSON: ")
    assert lines[1] == "record 3: jobRunId: expected an integer, got a string"
    assert lines[2].startswith("record 4: ")
    assert lines[3] == "shellinfo publish: nothing published (3 of 4 records invalid)"

    jsonl = b'{"jobRunId": 1}\n{"jobRunId": 2, "status": "kDone"}\nnot json\n'
    result = cli("publish", *at, "--strict", stdin=jsonl)
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert lines[0].startswith("record 2: status: "), lines
    assert lines[0].endswith(" (line 2)"), lines
    assert lines[1] == "record 3: not valid JSON: Expecting value at column 1 (line 3)"
    assert len(lines) == 3

    result = cli("publish", *at, stdin=b'[{"jobRunId": 1}, {"jobRunId": 2}')
    assert result.returncode == 2
    assert one_line(result).startswith("shellinfo publish: input is not valid JSON: ")

    for empty in (b"", b"  \n", b"[]"):  # empty input is no records, as for convert and validate
        result = cli("publish", *at, stdin=empty)
        assert result.returncode == 0
        assert one_line(result) == "shellinfo publish: no records in the input; nothing published"

    result = cli("list", *at, "--format", "jsonl")
    assert (result.returncode, result.stdout) == (0, b"")  # nothing was sent


def test_refused_updates_exit_1_and_name_the_field(serve: ServeFactory) -> None:
    server = serve()
    at = ("--address", server.address)
    assert cli("publish", *at, '{"jobRunId": 5, "status": "kSuccess"}').returncode == 0

    result = cli("publish", *at, '{"jobRunId": 5, "status": "kRunning"}')
    assert (result.returncode, result.stdout) == (1, b"")
    lines = result.stderr.decode().splitlines()
    assert lines == [
        "record 1 (jobRunId 5): refused: FAILED_PRECONDITION RUN_FINAL status: run 5 already has the final status"
        " kSuccess; status kRunning is refused",
        "shellinfo publish: 0 of 1 records recorded (none); refused: 1",
    ]

    # In a stream, the others go through; each refused record is named, then what was recorded.
    three = ('{"jobRunId": 6}', '{"jobRunId": 5, "status": "kFailure"}', '{"jobRunId": 11}')
    result = cli("publish", *at, "--format", "jsonl", *three)
    assert result.returncode == 1
    out = [json.loads(text) for text in result.stdout.decode().splitlines()]
    assert out[0] == {"record": 1, "jobRunId": 6, "revision": 2, "changed": True}
    assert out[1]["record"] == 2
    assert out[1]["jobRunId"] == 5
    assert out[1]["error"]["code"] == "FAILED_PRECONDITION"
    assert out[1]["error"]["reason"] == "RUN_FINAL"
    assert out[1]["error"]["field"] == "status"
    assert out[2] == {"record": 3, "jobRunId": 11, "revision": 3, "changed": True}
    lines = result.stderr.decode().splitlines()
    assert lines[0].startswith("record 2 (jobRunId 5): refused: FAILED_PRECONDITION RUN_FINAL status: ")
    assert lines[1] == "shellinfo publish: 2 of 3 records recorded (records 1, 3); refused: 2"
    assert len(lines) == 2

    # What the service never accepts is found before anything is sent: all or nothing.
    bad = ('{"jobRunId": 12}', "{}", '{"jobRunId": 13, "startTimeUsecs": 5, "endTimeUsecs": 4}')
    result = cli("publish", *at, *bad)
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr.decode().splitlines() == [
        "record 2: jobRunId: is required: it identifies the run",
        "record 3 (jobRunId 13): endTimeUsecs: end time 4 is before the start time 5",
        "shellinfo publish: nothing published (2 of 3 records invalid)",
    ]
    result = cli("publish", *at, "--source", "s" * 257, '{"jobRunId": 12}')
    assert result.returncode == 2
    assert one_line(result) == "shellinfo: --source: 257 bytes of UTF-8; the service accepts at most 256"
    assert cli("get", *at, "12").returncode == 1  # not published

    result = cli("get", *at, "99", "--source", "x")
    assert (result.returncode, result.stdout) == (1, b"")
    assert one_line(result) == "shellinfo: NOT_FOUND: no run with jobRunId 99 from source 'x'"


def test_no_server_is_one_line_and_exit_1() -> None:
    at = ("--address", f"127.0.0.1:{free_port()}")
    two = ('{"jobRunId": 1}', '{"jobRunId": 2}')
    for command in (("publish", '{"jobRunId": 1}'), ("publish", *two), ("get", "1"), ("list",)):
        result = cli(command[0], *at, *command[1:])
        assert (result.returncode, result.stdout) == (1, b""), command
        message = one_line(result)
        if command[1:] == two:  # a stream: which records were not acknowledged
            assert message.endswith(" (records 1-2 not acknowledged: recorded or not)")
        assert message.startswith("shellinfo: UNAVAILABLE: "), message


def test_watch_before_the_retained_history_is_out_of_range(serve: ServeFactory) -> None:
    server = serve(args=("--retain-updates", "2"))
    at = ("--address", server.address)
    result = cli("publish", *at, *(json.dumps({"jobRunId": n}) for n in range(4)))
    assert result.returncode == 0, result.stderr
    result = cli("watch", *at, "--from-revision", "1", "--format", "jsonl")
    assert (result.returncode, result.stdout) == (1, b"")
    assert one_line(result) == "shellinfo: OUT_OF_RANGE: revision 1 is no longer retained; the oldest available is 3"
    result = cli("watch", *at, "--from-revision", "3", "--count", "2", "--format", "jsonl")
    assert [json.loads(text)["revision"] for text in result.stdout.splitlines()] == [3, 4]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--store", "bogus://x"), "shellinfo: store URL 'bogus://x': unknown scheme"),
        (("--store", "sqlite:///"), "shellinfo: store URL 'sqlite:///': give a path"),
        (("--tls-client-ca", "ca.pem"), "shellinfo: --tls-client-ca needs --tls-cert and --tls-key"),
        (("--tls-cert", "server.pem"), "shellinfo: --tls-cert and --tls-key go together"),
        (("--tls-cert", "missing.pem", "--tls-key", "missing.key"), "shellinfo: TLS: cannot read missing.pem"),
        (("--token-file", "missing.txt"), "shellinfo: token file missing.txt: No such file or directory"),
        (("--address", "localhost"), "shellinfo: --address 'localhost': expected HOST:PORT"),
        (("--store", "sqlite://{tmp}"), "shellinfo: store {tmp}: is a directory"),
        (("--address", "127.0.0.1:{busy}"), "shellinfo: cannot listen on 127.0.0.1:{busy}: address already in use"),
    ],
)
def test_serve_settings_that_cannot_work_exit_2(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {"tmp": str(tmp_path), "busy": busy.getsockname()[1]}
        command = [arg.format(**values) for arg in ("serve", "--address", "127.0.0.1:0", "--store", "memory://", *args)]
        result = subprocess.run(
            [str(SCRIPT), *command], capture_output=True, timeout=60, env=ENV, cwd=tmp_path, check=False
        )
    assert (result.returncode, result.stdout) == (2, b""), result.stderr
    assert one_line(result).startswith(message.format(**values)), result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("list", "--status", "99999999999"), "shellinfo: --status: 99999999999 is not an enum number (int32)"),
        (("watch", "--snapshot", "--from-revision", "3"), "shellinfo: --snapshot starts from now"),
        (("get", "1", "--tls-cert", "c.pem"), "shellinfo: --tls-cert and --tls-key go together"),
        (("get", "1", "--token", " "), "shellinfo: --token: the token is empty"),
        (
            ("publish", "--address", "10.1.2.3:50051", "--token", "t", '{"jobRunId": 1}'),
            "shellinfo: refusing to send the token to 10.1.2.3:50051 in plaintext: use TLS (--tls-ca)",
        ),
        (("get", "1", "--tls-ca", "/nonexistent/ca.pem"), "shellinfo: TLS: cannot read the CA certificate"),
    ],
)
def test_client_settings_that_cannot_work_exit_2(args: tuple[str, ...], message: str) -> None:
    """Checked before any connection is made (in-process: nothing here reaches a server)."""
    status, out, err = in_process(*args)
    assert (status, out) == (2, ""), err
    assert err.startswith(message), err
    assert err.count("\n") == 1


def test_bad_numbers_are_usage_errors() -> None:
    for args in (
        ("watch", "--count", "0"),
        ("get", "x"),
        ("serve", "--retain-updates", "-1"),
        ("list", "--page-size", "0"),
    ):
        result = cli(*args)
        assert result.returncode == 2, args
        line = one_line(result)  # one line, that says where help is
        assert line.startswith(f"shellinfo {args[0]}: argument ")
        assert line.endswith(f"(see shellinfo {args[0]} --help)")


# --- the default store --------------------------------------------------------------------


def test_serve_keeps_its_store_at_the_documented_default_path(serve: ServeFactory, tmp_path: Path) -> None:
    home, state = tmp_path / "home", tmp_path / "state"
    home.mkdir()
    server = serve("", env={**ENV, "HOME": str(home), "XDG_STATE_HOME": str(state)})
    expected = state / "shellinfo" / "runs.sqlite3"
    assert server.store == sqlite_url(expected)
    assert expected.is_file()
    assert server.stop() == 0

    env = {key: value for key, value in ENV.items() if key != "XDG_STATE_HOME"}
    server = serve("", env={**env, "HOME": str(home)})
    expected = home / ".local" / "state" / "shellinfo" / "runs.sqlite3"
    assert server.store == sqlite_url(expected)
    assert expected.is_file()
    assert cli("publish", "--address", server.address, '{"jobRunId": 1}').returncode == 0
    assert server.stop() == 0
