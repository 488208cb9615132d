"""A bounded soak of a real ``shellinfo serve`` on SQLite (issue 7.11).

For ``SHELLINFO_SOAK_SECONDS`` (default 60) several publishers publish
changing runs (one by PublishRun, one by a PublishRuns stream), while fast,
slow (it stops reading now and then, so the server cuts it as too slow and
it resumes) and reconnecting (it closes its watch every few seconds and
opens a new one where it stopped) watchers watch from revision 1. Halfway,
the server is killed with SIGKILL and restarted on the same file and port.

It asserts that no acknowledged update is lost or repeated for any watcher:
each sees revisions strictly increasing, every acknowledged revision among
them, and all watchers agree on what each revision is (a revision is never
handed out twice). The server's resident memory (``VmRSS`` of
``/proc/<pid>/status``, sampled every 0.2 s) stays under RSS_BOUND_MIB.

More tests with real processes, for the classes that need them: a watcher
that stops reading while 0.9 MiB runs are published costs the server a bounded
amount (issue 7.4); a second server on the same SQLite file refuses to start
(7.7); out-of-range numeric options exit 2 naming the option (7.8); a run in
the store that REST cannot show does not stop ``list``/``watch``/``get`` from
serving the others (7.1).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_cli_service import (
    ENV,
    FAST,
    ServeFactory,
    Server,
    cli,
    serve,  # noqa: F401 - the fixture: real `shellinfo serve` processes, killed at teardown
    sqlite_url,
)

from shellinfo_grpc import ProtectionShellInfo
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as svc
from shellinfo_grpc.client import ReconnectPolicy, RunUpdateClient
from shellinfo_grpc.errors import ServiceError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)"),
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL"),
]

#: How long the soak runs, in seconds; CI may set a shorter one (10 s still kills and restarts the server).
SOAK_SECONDS = float(os.environ.get("SHELLINFO_SOAK_SECONDS", "60"))
#: The bound on the server's resident memory during the soak, in MiB.
RSS_BOUND_MIB = 256
#: A watcher is cut as too slow once this many updates wait for it.
MAX_WATCH_QUEUE = 200
#: Runs each publisher cycles through.
RUNS_PER_PUBLISHER = 40
RESUME = ReconnectPolicy(initial_delay=0.05, max_delay=0.5)


def rss_kib(pid: int) -> int | None:
    """The resident set size of ``pid`` in KiB, or None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Soak:
    """What the threads share: the stop flag, the acknowledgements, what each watcher saw."""

    address: str
    stop_publishing: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    acked: set[int] = field(default_factory=set)
    seen: dict[str, list[tuple[int, str, int, bytes]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    streams: dict[str, Any] = field(default_factory=dict)
    reconnects: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    publish_failures: int = 0

    def ack(self, revision: int) -> None:
        with self.lock:
            self.acked.add(revision)


def run_dict(source: str, n: int, step: int) -> dict[str, Any]:
    """The n-th run of a publisher in its step-th state: never final, so it can change for ever."""
    return {
        "jobRunId": n,
        "startTimeUsecs": 1_700_000_000_000_000 + n,
        "status": "kRunning" if step % 2 else "kAccepted",
        "error": f"{source} step {step} " + "." * 2000,  # 2 KB: a paused watcher soon has megabytes waiting
        "progressNote": {"step": step, "by": source},
    }


def publish_one_by_one(soak: Soak, source: str) -> None:
    step = 0
    with RunUpdateClient(soak.address, timeout=5, options=FAST) as client:
        while not soak.stop_publishing.is_set():
            step += 1
            try:
                result = client.publish(run_dict(source, step % RUNS_PER_PUBLISHER, step), source=source)
            except ServiceError:  # the server is down: the update may or may not be recorded, it is not acknowledged
                with soak.lock:
                    soak.publish_failures += 1
                time.sleep(0.05)
                continue
            if result.changed:
                soak.ack(result.revision)


def publish_streams(soak: Soak, source: str) -> None:
    step = 0
    with RunUpdateClient(soak.address, timeout=5, options=FAST) as client:
        while not soak.stop_publishing.is_set():
            batch = [run_dict(source, (step + i) % RUNS_PER_PUBLISHER, step + i) for i in range(1, 21)]
            step += 20
            try:
                for result in client.publish_many(batch, source=source):
                    if isinstance(result, ServiceError):
                        soak.errors.append(f"{source}: a stream publish was refused: {result}")
                    elif result.changed:
                        soak.ack(result.revision)
            except ServiceError:
                with soak.lock:
                    soak.publish_failures += 1
                time.sleep(0.05)


def watch(soak: Soak, name: str, kind: str) -> None:
    """Watch from revision 1 until stopped: fast, slow (pauses) or reconnecting (reopens its watch)."""
    seen = soak.seen.setdefault(name, [])
    rng = random.Random(name)
    next_revision = 1
    pause_at = time.monotonic() + rng.uniform(1, 3)
    with RunUpdateClient(soak.address, timeout=5, options=FAST, reconnect=RESUME) as client:
        while not soak.stop.is_set():
            opened = time.monotonic()
            stream = client.watch(start_revision=next_revision, progress_interval_ms=200)
            soak.streams[name] = stream  # closed by the test at the end: a watch waits for updates for ever
            if soak.stop.is_set():
                stream.close()
                return
            try:
                for event in stream:
                    if event.update is not None:
                        u = event.update
                        seen.append(
                            (u.revision, u.source, u.run.job_run_id, u.run.SerializeToString(deterministic=True))
                        )
                        next_revision = u.revision + 1
                    if soak.stop.is_set():
                        break
                    if kind == "slow" and time.monotonic() > pause_at and not soak.stop_publishing.is_set():
                        time.sleep(3)  # stops reading: the server cuts it as too slow; the watch resumes
                        pause_at = time.monotonic() + rng.uniform(2, 4)
                    if kind == "reconnecting" and time.monotonic() - opened > rng.uniform(1, 3):
                        break
            except ServiceError as exc:
                if not soak.stop.is_set():
                    soak.errors.append(f"{name}: the watch ended: {exc}")
                return
            finally:
                stream.close()
                soak.reconnects[name] = soak.reconnects.get(name, 0) + stream.reconnects


def test_soak_kill_and_restart_loses_and_repeats_nothing(tmp_path: Path, serve: ServeFactory) -> None:  # noqa: F811
    store = sqlite_url(tmp_path / "soak.sqlite3")
    args = ("--max-watch-queue", str(MAX_WATCH_QUEUE), "--log-level", "info")
    servers: list[Server] = [serve(store, args=args)]
    port = servers[0].port
    soak = Soak(servers[0].address)
    peak = {"rss": 0}

    def sample() -> None:
        while not soak.stop.is_set():
            kib = rss_kib(servers[-1].proc.pid)  # the restarted server once there is one
            if kib is not None:
                peak["rss"] = max(peak["rss"], kib)
            time.sleep(0.2)

    threads = [
        threading.Thread(target=publish_one_by_one, args=(soak, "pub-a"), daemon=True),
        threading.Thread(target=publish_one_by_one, args=(soak, "pub-b"), daemon=True),
        threading.Thread(target=publish_streams, args=(soak, "pub-stream"), daemon=True),
        threading.Thread(target=watch, args=(soak, "fast-1", "fast"), daemon=True),
        threading.Thread(target=watch, args=(soak, "fast-2", "fast"), daemon=True),
        threading.Thread(target=watch, args=(soak, "slow", "slow"), daemon=True),
        threading.Thread(target=watch, args=(soak, "reconnecting", "reconnecting"), daemon=True),
        threading.Thread(target=sample, daemon=True),
    ]
    for thread in threads:
        thread.start()
    time.sleep(SOAK_SECONDS / 2)
    servers[-1].proc.send_signal(signal.SIGKILL)
    servers[-1].proc.wait(20)
    killed_at = max(soak.acked, default=0)
    restart_began = time.monotonic()
    servers.append(serve(store, port=port, args=args))
    restart_seconds = time.monotonic() - restart_began
    time.sleep(SOAK_SECONDS / 2)

    # Stop publishing, then let every watcher catch up with the last acknowledged revision.
    soak.stop_publishing.set()
    for thread in threads[:3]:
        thread.join(20)
    last = max(soak.acked)
    catch_up_began = time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(not seen or seen[-1][0] < last for seen in soak.seen.values()):
        time.sleep(0.1)
    catch_up_seconds = time.monotonic() - catch_up_began
    soak.stop.set()
    for stream in list(soak.streams.values()):
        stream.close()
    for thread in threads[3:]:
        thread.join(20)
    assert not any(thread.is_alive() for thread in threads), "a publisher or watcher did not stop"

    assert not soak.errors, soak.errors[:5]
    assert len(soak.acked) > 100, f"only {len(soak.acked)} updates acknowledged: the soak did not soak"
    assert killed_at > 0
    by_revision: dict[int, tuple[str, int, bytes]] = {}
    for name, seen in soak.seen.items():
        revisions = [r for r, *_ in seen]
        repeats = [b for a, b in itertools.pairwise(revisions) if b <= a]
        assert not repeats, f"{name} saw revisions out of order or twice: {repeats[:10]}"
        missing = sorted(soak.acked - set(revisions))
        assert not missing, f"{name} never saw {len(missing)} acknowledged revisions: {missing[:10]}"
        for revision, *what in seen:
            assert by_revision.setdefault(revision, tuple(what)) == tuple(what), f"revision {revision} handed out twice"
    rss_mib = peak["rss"] / 1024
    cut = sum(server.err.text().count("WATCHER_TOO_SLOW") for server in servers)
    print(
        f"soak {SOAK_SECONDS:.0f} s: {len(soak.acked)} acknowledged updates (last revision {last}; SIGKILL after"
        f" {killed_at}), {soak.publish_failures} publishes failed while the server was down;"
        f" watchers saw {', '.join(f'{n} {len(s)}' for n, s in sorted(soak.seen.items()))}"
        f" (resumed {', '.join(f'{n} {k}' for n, k in sorted(soak.reconnects.items()))} times);"
        f" {cut} watches cut as too slow (server log); peak server RSS {rss_mib:.0f} MiB;"
        f" restart took {restart_seconds:.1f} s, the watchers caught up"
        f" {catch_up_seconds:.1f} s after the publishers stopped"
    )
    assert rss_mib < RSS_BOUND_MIB, f"server RSS peaked at {rss_mib:.0f} MiB (bound {RSS_BOUND_MIB})"


#: What one stalled watcher may cost the server while 1 MiB runs are published (issue 7.4: the
#: 64 MiB default byte limit of a watcher's queue, plus 32 MiB for gRPC's transport buffers).
STALLED_WATCHER_BOUND_MIB = 96


def test_a_stalled_watcher_costs_the_server_a_bounded_amount(tmp_path: Path, serve: ServeFactory) -> None:  # noqa: F811
    import grpc

    from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as svc
    from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2_grpc as svc_grpc

    server = serve(sqlite_url(tmp_path / "stalled.sqlite3"))
    with grpc.insecure_channel(server.address) as channel:
        stalled = svc_grpc.RunUpdateServiceStub(channel).WatchRuns(svc.WatchRunsRequest(start_revision=1))
        time.sleep(0.5)
        baseline = rss_kib(server.proc.pid) or 0
        peak = baseline
        with RunUpdateClient(server.address, timeout=20, options=FAST) as client:
            for n in range(200):  # 180 MiB in all, published while the watcher reads nothing
                client.publish({"jobRunId": n, "status": "kRunning", "error": "x" * 900_000}, source="big")
                peak = max(peak, rss_kib(server.proc.pid) or 0)
        time.sleep(1)
        peak = max(peak, rss_kib(server.proc.pid) or 0)
        stalled.cancel()
    grown = (peak - baseline) / 1024
    print(f"stalled watcher, 200 runs of 0.9 MiB: server RSS {baseline / 1024:.0f} -> {peak / 1024:.0f} MiB")
    assert grown < STALLED_WATCHER_BOUND_MIB, f"the server grew by {grown:.0f} MiB for one stalled watcher"


def test_a_second_server_on_the_same_file_refuses_to_start(tmp_path: Path, serve: ServeFactory) -> None:  # noqa: F811
    store = sqlite_url(tmp_path / "one.sqlite3")
    first = serve(store)
    second = subprocess.Popen(
        [str(Path(sys.executable).with_name("shellinfo")), "serve", "--address", "127.0.0.1:0", "--store", store],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    try:
        _, err = second.communicate(timeout=10)  # refusing takes as long as starting: a few seconds at most
    except subprocess.TimeoutExpired:
        second.kill()
        _, err = second.communicate()
    lines = err.decode().splitlines()
    assert second.returncode == 2, f"the second server did not refuse: {lines}"
    assert len(lines) == 1, lines
    with RunUpdateClient(first.address, timeout=10, options=FAST) as client:
        assert client.publish({"jobRunId": 1}).revision == 1  # the first one keeps working


#: Numeric options and values beyond what they can hold (int32 page sizes, int64 revisions, finite seconds).
OUT_OF_RANGE_OPTIONS = {
    "list --page-size": (["list", "--address", "127.0.0.1:1", "--page-size"], [2**31, 10**11, 2**63]),
    "watch --from-revision": (["watch", "--address", "127.0.0.1:1", "--from-revision"], [2**63, 10**30]),
    "serve --retain-seconds": (
        ["serve", "--address", "127.0.0.1:0", "--store", "memory://", "--retain-seconds"],
        [1e303, 1e20],
    ),
    "serve --retain-updates": (
        ["serve", "--address", "127.0.0.1:0", "--store", "memory://", "--retain-updates"],
        [2**63, 10**23],
    ),
    "serve --max-watch-queue": (
        ["serve", "--address", "127.0.0.1:0", "--store", "memory://", "--max-watch-queue"],
        [2**63, 10**23],
    ),
}


@pytest.mark.parametrize("option", list(OUT_OF_RANGE_OPTIONS))
def test_out_of_range_options_exit_2_naming_the_option(option: str) -> None:
    command, values = OUT_OF_RANGE_OPTIONS[option]
    for value in values:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("shellinfo")), *command, str(value)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        try:
            _, err = proc.communicate(timeout=8)  # a refusal is immediate; a server or a watch would run on
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        text = err.decode()
        assert "Traceback" not in text, text[-300:]
        assert proc.returncode == 2, (value, proc.returncode, text[-300:])
        assert option.split()[1] in text.splitlines()[-1], text


#: Runs REST cannot show (to_rest refuses them), as a store written before the checks may hold.
UNSHOWABLE = {
    "NaN": ProtectionShellInfo(job_run_id=1, unrecognized={"extra_keys": [{"key": "x", "json_value": "NaN"}]}),
    "deep": ProtectionShellInfo(
        job_run_id=1, unrecognized={"extra_keys": [{"key": "x", "json_value": "[" * 100 + "]" * 100}]}
    ),
    "trailing data": ProtectionShellInfo(
        job_run_id=1, unrecognized={"extra_keys": [{"key": "x", "json_value": "1 2"}]}
    ),
}


@pytest.mark.parametrize("kind", list(UNSHOWABLE))
def test_a_bad_record_already_in_the_store_is_skipped_or_shown_raw(
    tmp_path: Path,
    serve: ServeFactory,  # noqa: F811
    kind: str,
) -> None:
    """Issue 7.1: get, list and watch survive a stored run REST cannot show: one line on stderr, the rest served."""
    path = tmp_path / "planted.sqlite3"
    server = serve(sqlite_url(path))
    with RunUpdateClient(server.address, timeout=10, options=FAST) as client:
        client.publish({"jobRunId": 1, "status": "kRunning"})
        client.publish({"jobRunId": 2, "status": "kRunning"})
    assert server.stop() == 0
    bad = UNSHOWABLE[kind]
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        update = svc.RunUpdate(source="", run=bad, revision=1)
        conn.execute(
            "UPDATE updates SET run = ?, wire = ? WHERE revision = 1",
            (bad.SerializeToString(), update.SerializeToString()),
        )
        conn.execute("UPDATE runs SET run = ? WHERE job_run_id = 1", (bad.SerializeToString(),))
    server = serve(sqlite_url(path))
    at = ("--address", server.address)
    for args in (
        ("list", "--format", "jsonl", *at),
        ("watch", "--format", "jsonl", "--from-revision", "1", "--count", "1", *at),  # counts what it shows
    ):
        result = cli(*args)
        problems = result.stderr.decode().splitlines()
        assert len(problems) <= 1 + (args[0] == "watch"), problems  # watch also says where it starts
        assert b'"jobRunId":2' in result.stdout.replace(b" ", b""), (args, result.stdout, problems)
    result = cli("get", "1", *at)
    assert result.returncode != 0 or result.stdout, result
    assert len(result.stderr.decode().splitlines()) <= 1
    assert cli("get", "2", *at).returncode == 0
