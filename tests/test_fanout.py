"""Tests of shellinfo_grpc._fanout: the hub that hands every commit to every watcher.

Two levels. Through a real server on 127.0.0.1 (port 0): a watcher that stops
reading is ended by the byte bound of its queue (``max_watch_queue_bytes``)
while a fast watcher on the same server gets everything. Directly on a
:class:`~shellinfo_grpc._fanout.Hub` over a real MemoryStore, with generated
commits, filters and batch limits: what a watcher gets is exactly the matching
updates in revision order, in responses within the batch limits, however the
commits and the watcher's reading interleave (responses built once per
filter shape and joined when several wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncGenerator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from harness import aio_test
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shellinfo_grpc import from_rest
from shellinfo_grpc._fanout import Hub
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as svc
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2_grpc as svc_grpc
from shellinfo_grpc.server import ServerConfig, create_server
from shellinfo_grpc.stores.memory import MemoryStore

pytestmark = pytest.mark.timeout(60)

# A connection whose reader never reads fills its HTTP/2 window after a few
# dozen kB: the server's writes to it stall (see tests/test_server.py).
SLOW_READER = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 16_384),
    ("grpc.use_local_subchannel_pool", 1),
]
BIG = 256 * 1024  # bytes of padding in each published run


def padded(i: int, pad: int) -> svc.PublishRunsRequest:
    return svc.PublishRunsRequest(
        source="big", run=from_rest({"jobRunId": i, "status": "kRunning", "error": "x" * pad})
    )


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError("no ErrorInfo in the status details")


async def read_to_error(call: Any) -> tuple[list[int], int, grpc.aio.AioRpcError]:
    """Read a watch until it fails: the revisions of its updates, the last revision reported, the error."""
    got: list[int] = []
    last = 0
    try:
        while (response := await call.read()) is not grpc.aio.EOF:
            got.extend(u.revision for u in response.updates)
            last = response.revision
    except grpc.aio.AioRpcError as exc:
        return got, last, exc
    raise AssertionError("the watch ended without an error")


@aio_test
async def test_byte_bound_ends_a_stalled_watcher_and_not_a_fast_one() -> None:
    total = 48  # 12 MiB published; the bound is 2 MiB, the count bound far away
    config = ServerConfig(max_watch_queue=10_000, max_watch_queue_bytes=2 << 20)
    running = await create_server("127.0.0.1:0", MemoryStore(), config)
    target = f"127.0.0.1:{running.port}"
    channels = [grpc.aio.insecure_channel(target, options=o) for o in (SLOW_READER, [], [])]
    try:
        slow_stub, fast_stub, pub_stub = (svc_grpc.RunUpdateServiceStub(c) for c in channels)
        slow = slow_stub.WatchRuns(svc.WatchRunsRequest(include_snapshot=True))
        fast = fast_stub.WatchRuns(svc.WatchRunsRequest(include_snapshot=True))
        assert (await slow.read()).snapshot_complete  # both are registered now
        assert (await fast.read()).snapshot_complete

        got_fast: list[int] = []

        async def read_fast() -> None:
            while len(got_fast) < total:
                got_fast.extend(u.revision for u in (await fast.read()).updates)

        reader = asyncio.create_task(read_fast())
        acks = [ack async for ack in pub_stub.PublishRuns(iter([padded(i + 1, BIG) for i in range(total)]))]
        assert [(a.revision, a.HasField("error")) for a in acks] == [(i + 1, False) for i in range(total)]
        await asyncio.wait_for(reader, 20)
        assert got_fast == list(range(1, total + 1))  # all, in order, once

        got_slow, last, error = await read_to_error(slow)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(error)
        assert info.reason == "WATCHER_TOO_SLOW"
        assert "bytes" in error.details()
        assert info.metadata["last_revision"] == str(last)
        assert got_slow == list(range(1, len(got_slow) + 1))  # no gap in what it got
        # It was ended by bytes: it held far fewer updates than the count bound.
        assert len(got_slow) < total
        fast.cancel()
    finally:
        for c in channels:
            await c.close()
        await running.stop(grace=0)


@aio_test
async def test_one_commit_larger_than_the_byte_bound_does_not_end_a_watcher_that_keeps_up() -> None:
    config = ServerConfig(max_watch_queue_bytes=64 * 1024, max_batch_bytes=64 * 1024)
    running = await create_server("127.0.0.1:0", MemoryStore(), config)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        call = svc_grpc.RunUpdateServiceStub(channel).WatchRuns(svc.WatchRunsRequest())
        assert (await call.read()).revision == 0
        # 40 runs of 8 kB in one commit: 320 kB, five times the bound.
        await running.store.publish_batch([(r.source, r.run) for r in (padded(i + 1, 8192) for i in range(40))])
        got: list[int] = []
        while len(got) < 40:
            response = await call.read()
            assert response.ByteSize() <= 2 * 64 * 1024  # split into responses of about max_batch_bytes
            got.extend(u.revision for u in response.updates)
        assert got == list(range(1, 41))
        call.cancel()
    finally:
        await channel.close()
        await running.stop(grace=0)


# --- the hub itself, under generated commits -----------------------------------------


async def _drain(stream: AsyncGenerator[Any, None], until: int) -> list[svc.WatchRunsResponse]:
    """Responses of ``stream`` (bytes or messages) until one reports revision ``until`` (none if 0)."""
    out: list[svc.WatchRunsResponse] = []
    if not until:
        return out
    async for item in stream:
        response = item if isinstance(item, svc.WatchRunsResponse) else svc.WatchRunsResponse.FromString(item)
        out.append(response)
        if response.revision >= until:
            break
    return out


commits = st.lists(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 300)), min_size=1, max_size=12),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    commits=commits,
    reads=st.lists(st.booleans(), min_size=12, max_size=12),
    max_updates=st.integers(1, 8),
    max_bytes=st.integers(50, 2000),
    sources=st.sets(st.sampled_from(["a", "b", "c"])),
    paced=st.booleans(),
)
def test_each_watcher_gets_exactly_its_matching_updates_in_order(
    commits: list[list[tuple[str, int]]],
    reads: list[bool],
    max_updates: int,
    max_bytes: int,
    sources: set[str],
    paced: bool,
) -> None:
    async def body() -> None:
        store = MemoryStore()
        await store.start()
        # Paced: a budget of one response a second paces the three watches (5 ms apart at most).
        pacing = {"send_budget": 1, "max_pace": 0.005} if paced else {}
        hub = Hub(store, max_queue=10_000, max_batch_updates=max_updates, max_batch_bytes=max_bytes, **pacing)
        flt = svc.RunFilter(sources=sorted(sources)) if sources else None
        # Two watchers of the same shape share responses; one unfiltered watcher beside them.
        streams: list[Any] = [
            hub.watch(flt, 0, False, 5.0),
            hub.watch(flt, 0, False, 5.0),
            hub.watch(None, 0, False, 5.0),
        ]
        got: list[list[svc.WatchRunsResponse]] = [[await anext(s)] for s in streams]  # registered
        wants = [set(sources) or {"a", "b", "c"}] * 2 + [{"a", "b", "c"}]
        newest = [0, 0, 0]  # the newest revision each watcher matches

        async def read_all() -> None:
            head = await store.history(1, store.head_revision(), 10_000)
            for i, stream in enumerate(streams):
                mine = [u.revision for u in head if u.source in wants[i]]
                if mine and mine[-1] > newest[i]:
                    got[i] += await _drain(stream, mine[-1])
                    newest[i] = mine[-1]

        job = 0
        for k, commit in enumerate(commits):
            items = []
            for source, pad in commit:
                job += 1
                items.append((source, from_rest({"jobRunId": job, "status": "kRunning", "error": "e" * pad})))
            await store.publish_batch(items)
            if reads[k]:  # the watchers read now, or let commits pile up
                await read_all()
        await read_all()
        for stream in streams:
            with contextlib.suppress(StopAsyncIteration):
                await stream.aclose()
        hub.close()
        everything = [(u.revision, u.source) for u in await store.history(1, store.head_revision(), 10_000)]
        for index, responses in enumerate(got):
            updates = [u for r in responses for u in r.updates]
            assert [(u.revision, u.source) for u in updates] == [x for x in everything if x[1] in wants[index]]
            reported = [r.revision for r in responses]
            assert reported == sorted(reported)
            assert reported[-1] >= newest[index]
            for r in responses:
                assert not r.updates or r.revision >= r.updates[-1].revision
                if len(r.updates) > 1:  # only a single update may exceed a batch limit
                    assert len(r.updates) <= max_updates
                    assert sum(u.ByteSize() for u in r.updates) <= max_bytes
        assert [r.SerializeToString() for r in got[0]] == [r.SerializeToString() for r in got[1]]

    asyncio.run(asyncio.wait_for(body(), 20))


@pytest.mark.parametrize(
    ("watchers", "pace"), [(1, 0.0), (10, 0.0), (49, 0.0), (50, 0.005), (100, 0.01), (1_000, 0.1), (5_000, 0.1)]
)
def test_the_pace_grows_with_the_number_of_watches_up_to_its_bound(watchers: int, pace: float) -> None:
    """Under the send budget nothing is paced; past it each watch sends less often, at most every 100 ms."""

    async def body() -> None:
        hub = Hub(MemoryStore(), max_queue=10, max_batch_updates=10, max_batch_bytes=1 << 20)
        registered = [hub.register(None) for _ in range(watchers)]
        assert hub.pace == pytest.approx(pace)
        for watcher in registered:
            hub.unregister(watcher)
        assert hub.pace == 0.0
        hub.close()

    asyncio.run(body())


def test_a_paced_watch_sends_an_update_at_once_then_joins_what_comes_within_its_pace() -> None:
    """An update that finds the watch idle goes out at once; what follows within the pace waits for
    the watch's slot and goes in one response; a full response never waits, held or not."""
    pace = 0.2

    async def body() -> None:
        store = MemoryStore()
        await store.start()
        # A budget of one response a second makes a single watch paced.
        hub = Hub(store, max_queue=100, max_batch_updates=3, max_batch_bytes=1 << 20, send_budget=1, max_pace=pace)
        stream: Any = hub.watch(None, 0, False, 60.0)
        assert (await anext(stream)).revision == 0  # the first says where now is
        assert hub.pace == pace
        runs = (from_rest({"jobRunId": i, "status": "kRunning"}) for i in itertools.count(1))

        async def next_response() -> tuple[list[str], float]:
            started = time.monotonic()
            response = svc.WatchRunsResponse.FromString(await asyncio.wait_for(anext(stream), 5))
            assert response.revision == response.updates[-1].revision
            return [u.source for u in response.updates], time.monotonic() - started

        reading = asyncio.ensure_future(next_response())
        await asyncio.sleep(0.01)  # the watch waits for its queue
        await store.publish_batch([("first", next(runs))])
        assert (await reading)[0] == ["first"]  # at once: the watch was idle
        sent = time.monotonic()
        reading = asyncio.ensure_future(next_response())
        await store.publish_batch([("a", next(runs))])
        await asyncio.sleep(0.02)
        await store.publish_batch([("b", next(runs))])
        sources, _ = await reading
        assert sources == ["a", "b"]  # one response for both
        assert time.monotonic() - sent >= pace - 0.01  # not before its slot
        # Three updates fill a response: it goes out without waiting for the slot.
        await store.publish_batch([("c", next(runs)), ("d", next(runs)), ("e", next(runs))])
        sources, waited = await next_response()
        assert sources == ["c", "d", "e"]
        assert waited < pace / 2
        # Held with one update, the watch goes as soon as its response is full.
        sent = time.monotonic()
        reading = asyncio.ensure_future(next_response())
        await store.publish_batch([("f", next(runs))])
        await asyncio.sleep(0.02)
        assert not reading.done()  # paced: f waits for the slot
        await store.publish_batch([("g", next(runs)), ("h", next(runs))])
        sources, _ = await reading
        assert sources == ["f", "g", "h"]
        assert time.monotonic() - sent < pace / 2
        await stream.aclose()
        hub.close()

    asyncio.run(asyncio.wait_for(body(), 10))


def test_closing_the_hub_releases_a_paced_watch_at_once() -> None:
    async def body() -> None:
        store = MemoryStore()
        await store.start()
        hub = Hub(store, max_queue=100, max_batch_updates=100, max_batch_bytes=1 << 20, send_budget=1, max_pace=30.0)
        stream: Any = hub.watch(None, 0, False, 60.0)
        await anext(stream)
        await store.publish_batch([("a", from_rest({"jobRunId": 1}))])
        await anext(stream)  # sent at once; the next one would wait 30 s
        await store.publish_batch([("b", from_rest({"jobRunId": 2}))])
        reading = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.02)
        assert not reading.done()
        hub.close()
        with pytest.raises(Exception, match="shutting down"):
            await asyncio.wait_for(reading, 2)

    asyncio.run(asyncio.wait_for(body(), 10))


@aio_test
async def test_paced_watchers_on_a_real_server_get_every_update_once_in_order_in_fewer_responses() -> None:
    """80 watches are paced (8 ms): 400 unary publishes reach every one, in order, joined into fewer responses."""
    watchers, total = 80, 400
    running = await create_server("127.0.0.1:0", MemoryStore())
    target = f"127.0.0.1:{running.port}"
    channels = [grpc.aio.insecure_channel(target) for _ in range(5)]
    try:
        stubs = [svc_grpc.RunUpdateServiceStub(c) for c in channels]
        calls = [stubs[i % 4].WatchRuns(svc.WatchRunsRequest()) for i in range(watchers)]
        for call in calls:
            assert (await call.read()).revision == 0  # registered: the first response says where now is
        got: list[list[int]] = [[] for _ in calls]
        responses = [0] * watchers

        async def read(k: int) -> None:
            while len(got[k]) < total:
                response = await calls[k].read()
                assert response is not grpc.aio.EOF
                got[k].extend(u.revision for u in response.updates)
                responses[k] += response.updates != []

        readers = [asyncio.create_task(read(k)) for k in range(watchers)]
        publish = stubs[4].PublishRun

        async def publisher(first: int) -> None:  # 8 of them: commits far more often than every 8 ms
            for job in range(first, total + 1, 8):
                await publish(svc.PublishRunRequest(source="s", run=from_rest({"jobRunId": job, "status": "kRunning"})))

        await asyncio.gather(*(publisher(k) for k in range(1, 9)))
        await asyncio.wait_for(asyncio.gather(*readers), 30)
        assert all(revisions == list(range(1, total + 1)) for revisions in got)
        # Pacing joined updates that came within a watch's 8 ms.
        assert sum(responses) < watchers * total * 0.9, responses
    finally:
        for call in calls:
            call.cancel()
        for c in channels:
            await c.close()
        await running.stop(grace=0)
