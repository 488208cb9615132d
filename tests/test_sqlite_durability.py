"""SIGKILL proof of SqliteStore: an acknowledged update is never lost, a batch is never half applied.

A child process publishes a burst of batches from many concurrent publishers
and prints one line per acknowledged update as soon as ``publish_batch``
returns. The parent kills it with SIGKILL at a random moment mid-burst,
reopens the file and checks every acknowledged update, the gapless history,
whole batches and the latest state of every run. Several rounds share one
file, so the later rounds also prove that recovery continues the revisions.
(The same is tested through the gRPC server elsewhere.)
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as svc
from shellinfo_grpc.stores.sqlite import SqliteStore

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

PUBLISHERS = 64

# Each publisher sends batches of 1-3 updates of its own runs; the run's error
# text names the batch and the item's place in it ("<batch> <k>/<size>").
CHILD = r"""
import asyncio
import sys
from pathlib import Path

from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as pb
from shellinfo_grpc.stores.sqlite import SqliteStore


async def main(path: str, round_: str, synchronous: str, publishers: int) -> None:
    store = SqliteStore(Path(path), synchronous=synchronous)
    await store.start()
    out = sys.stdout

    async def publisher(number: int) -> None:
        source = f"agent-{number}"
        index = 0
        while True:
            size = 1 + (number + index) % 3
            batch = f"{round_}.{number}.{index}"
            items = [
                (
                    source,
                    pb.ProtectionShellInfo(
                        job_run_id=(index * 3 + k) % 40,
                        status=pb.RUN_STATUS_RUNNING,
                        start_time_usecs=index,
                        error=f"{batch} {k}/{size}",
                    ),
                )
                for k in range(size)
            ]
            outcomes = await store.publish_batch(items)
            acks = (f"{s} {r.job_run_id} {o.update.revision} {batch}\n" for (s, r), o in zip(items, outcomes))
            out.write("".join(acks))
            out.flush()
            index += 1

    print("ready", flush=True)
    await asyncio.gather(*(publisher(n) for n in range(publishers)))


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""

Ack = tuple[str, int, int, str]  # source, job_run_id, revision, batch


def burst_and_kill(path: Path, round_: int, synchronous: str, kill_after: int, delay: float, log: Path) -> list[Ack]:
    """Run the child until it has acknowledged ``kill_after`` updates and ``delay`` seconds more, SIGKILL it.

    Returns every acknowledgement it printed.
    """
    with log.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(round_), synchronous, str(PUBLISHERS)],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    assert child.stdout is not None
    lines: list[bytes] = []
    try:
        assert child.stdout.readline() == b"ready\n", log.read_text()
        while len(lines) < kill_after:
            line = child.stdout.readline()
            assert line.endswith(b"\n"), f"the child stopped early: {log.read_text()}"
            lines.append(line[:-1])
        time.sleep(delay)  # and then any moment
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # What the child wrote before it died is still in the pipe; a cut-off last line is not an ack.
    rest = child.stdout.read()
    child.stdout.close()
    lines.extend(rest.split(b"\n")[:-1])
    return [parse(line) for line in lines]


def parse(line: bytes) -> Ack:
    source, job_run_id, revision, batch = line.decode().split(" ")
    return source, int(job_run_id), int(revision), batch


def read_back(path: Path) -> tuple[int, list[svc.RunUpdate], list[svc.RunUpdate]]:
    async def main() -> tuple[int, list[svc.RunUpdate], list[svc.RunUpdate]]:
        store = SqliteStore(path)
        await store.start()
        try:
            head = store.head_revision()
            history = await store.history(1, head, 10_000_000)
            runs = await store.list_runs(None, None, 10_000_000)
            return head, history, runs
        finally:
            await store.close()

    return asyncio.run(main())


def check(path: Path, acks: list[Ack], previous_head: int) -> int:
    head, history, runs = read_back(path)
    assert head > previous_head
    assert [u.revision for u in history] == list(range(1, head + 1)), "the history has gaps"
    by_revision = {u.revision: u for u in history}
    for source, job_run_id, revision, batch in acks:
        update = by_revision.get(revision)
        assert update is not None, f"acknowledged revision {revision} is lost"
        assert (update.source, update.run.job_run_id) == (source, job_run_id)
        assert update.run.error.split(" ")[0] == batch
    # Whole batches only: every batch in the history has all its items, in order, on consecutive revisions.
    batches: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for update in history:
        batch, place = update.run.error.split(" ")
        k, size = (int(n) for n in place.split("/"))
        batches[batch].append((update.revision, k, size))
    for batch, items in batches.items():
        size = items[0][2]
        assert [k for _, k, _ in items] == list(range(size)), f"batch {batch} is half applied: {items}"
        assert [r for r, _, _ in items] == list(range(items[0][0], items[0][0] + size))
    # The latest state of every run is its last update in the history.
    last: dict[tuple[str, int], svc.RunUpdate] = {}
    for update in history:
        last[(update.source, update.run.job_run_id)] = update
    assert sorted(last) == [(u.source, u.run.job_run_id) for u in runs]
    assert all(last[(u.source, u.run.job_run_id)] == u for u in runs)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    return head


def test_sigkill_loses_no_acknowledged_update(tmp_path: Path) -> None:
    path = tmp_path / "store" / "runs.sqlite3"
    seed = random.randrange(2**32)
    print(f"random seed {seed}")  # shown when the test fails
    chooser = random.Random(seed)
    every: list[Ack] = []
    head = 0
    for round_, synchronous in enumerate(["FULL", "FULL", "FULL", "FULL", "NORMAL"]):
        kill_after = chooser.randrange(200, 3000)
        delay = chooser.random() * 0.02
        acks = burst_and_kill(path, round_, synchronous, kill_after, delay, tmp_path / f"child-{round_}.log")
        every.extend(acks)
        new_head = check(path, every, head)
        assert new_head >= head + kill_after, f"seed {seed}"
        head = new_head
