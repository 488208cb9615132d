"""End-to-end tests of shellinfo_grpc.server: a real grpc.aio server on 127.0.0.1, port 0.

The tests speak to the service through the raw generated stubs, never through
the high-level client, so that they check the wire contract of
``proto/shellinfo/v1/run_update_service.proto`` itself: status codes and
google.rpc details of refusals, the publish rules, the watch guarantees
(order, batching, snapshot, filters, progress, resume, retention, slow
watchers), graceful shutdown, health, and reflection as seen by ``buf curl``.

Each test runs its own event loop (``asyncio.run``) under a hard deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import BUF, aio_test, buf_curl

from shellinfo_grpc import ProtectionShellInfo, RunStatus, RunType, from_rest
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as svc
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2_grpc as svc_grpc
from shellinfo_grpc.server import SERVICE_NAME, RunningServer, ServerConfig, create_server
from shellinfo_grpc.stores import Retention, Store
from shellinfo_grpc.stores.memory import MemoryStore

# Every test is bounded: its event loop is cancelled after harness.DEADLINE
# seconds, and pytest-timeout is the backstop should a loop not even get there.
pytestmark = pytest.mark.timeout(30)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FINAL = ["kSuccess", "kFailure", "kWarning", "kCanceled", "kMissed"]
NOT_FINAL = ["kAccepted", "kRunning", "kCanceling", "kOnHold", "kFinalizing"]


# --- harness ------------------------------------------------------------------


@dataclass
class Harness:
    """A started server, a channel to it, and stubs on that channel."""

    running: RunningServer
    channel: grpc.aio.Channel
    stub: svc_grpc.RunUpdateServiceStub
    health: health_pb2_grpc.HealthStub
    target: str
    extra_channels: list[grpc.aio.Channel] = field(default_factory=list)

    def new_channel(self, options: Sequence[tuple[str, Any]] = ()) -> svc_grpc.RunUpdateServiceStub:
        """A stub on a connection of its own (a separate subchannel pool)."""
        channel = grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1), *options])
        self.extra_channels.append(channel)
        return svc_grpc.RunUpdateServiceStub(channel)

    async def publish(self, source: str = "c1", **rest: Any) -> svc.PublishRunResponse:
        return await self.stub.PublishRun(svc.PublishRunRequest(source=source, run=from_rest(rest)))

    async def publish_many(self, requests: Iterable[svc.PublishRunsRequest]) -> list[svc.PublishRunsResponse]:
        acks = [ack async for ack in self.stub.PublishRuns(iter(list(requests)))]
        assert all(not ack.HasField("error") for ack in acks), [a.error for a in acks if a.HasField("error")]
        return acks


@contextlib.asynccontextmanager
async def serving(store: Store | None = None, config: ServerConfig | None = None) -> AsyncIterator[Harness]:
    running = await create_server("127.0.0.1:0", store if store is not None else MemoryStore(), config)
    target = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(target)
    harness = Harness(
        running,
        channel,
        svc_grpc.RunUpdateServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
        target,
    )
    try:
        yield harness
    finally:
        for extra in harness.extra_channels:
            await extra.close()
        await channel.close()
        await running.stop(grace=0)


def req(source: str = "c1", **rest: Any) -> svc.PublishRunsRequest:
    """One PublishRuns request; the run is given in REST terms."""
    return svc.PublishRunsRequest(source=source, run=from_rest(rest))


def numbered(count: int, *, source: str = "bulk", first: int = 1, pad: int = 0) -> list[svc.PublishRunsRequest]:
    """``count`` updates of distinct runs, each a new revision."""
    error = {"error": "x" * pad} if pad else {}
    return [req(source, jobRunId=first + i, status="kRunning", **error) for i in range(count)]


@dataclass(frozen=True)
class RichError:
    """What a refusal says: code, message, ErrorInfo and BadRequest details."""

    code: grpc.StatusCode
    message: str
    reason: str | None
    domain: str | None
    metadata: dict[str, str]
    fields: list[str]


def rich_error(exc: grpc.aio.AioRpcError) -> RichError:
    """Decode the google.rpc.Status carried in ``grpc-status-details-bin``."""
    raw = None
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            raw = value
    reason = domain = None
    metadata: dict[str, str] = {}
    fields: list[str] = []
    if raw is not None:
        status = status_pb2.Status.FromString(raw)
        assert status.code == exc.code().value[0]
        assert status.message == exc.details()
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields.extend(v.field for v in bad.field_violations)
                assert all(v.description for v in bad.field_violations)
    return RichError(exc.code(), exc.details() or "", reason, domain, metadata, fields)


async def next_response(call: Any, timeout: float = 5.0) -> Any:
    """The next message of a streaming call; fails on a clean end of stream."""
    response = await asyncio.wait_for(call.read(), timeout)
    assert response is not grpc.aio.EOF, "the stream ended"
    return response


async def read_until(call: Any, revision: int) -> list[svc.WatchRunsResponse]:
    """Read watch responses until one says every update up to ``revision`` was sent."""
    responses: list[svc.WatchRunsResponse] = []
    while True:
        response = await next_response(call)
        responses.append(response)
        if response.revision >= revision:
            return responses


async def watch_error(call: Any) -> tuple[RichError, list[svc.WatchRunsResponse]]:
    """Read a watch to its end, which must be an error; return it and what came before."""
    responses: list[svc.WatchRunsResponse] = []

    async def drain() -> None:
        while True:
            response = await asyncio.wait_for(call.read(), 5.0)
            assert response is not grpc.aio.EOF, "the watch ended without an error"
            responses.append(response)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await drain()
    return rich_error(caught.value), responses


def revisions(responses: Iterable[svc.WatchRunsResponse]) -> list[int]:
    return [update.revision for response in responses for update in response.updates]


def check_watch_invariants(responses: Sequence[svc.WatchRunsResponse], *, start: int = 0) -> None:
    """What holds for every watch: updates in strictly increasing revision
    order, and each response's ``revision`` covers the updates it carries and
    never goes back."""
    last_update = start - 1
    last_revision = start - 1 if start else 0
    for response in responses:
        for update in response.updates:
            assert update.revision > last_update
            last_update = update.revision
        if response.updates:
            assert response.revision >= response.updates[-1].revision
        assert response.revision >= last_revision
        last_revision = response.revision


# --- 1. refusals: one table -----------------------------------------------------

Setup = Callable[[Harness], Awaitable[Any]]


async def _no_setup(h: Harness) -> None:
    return None


async def _final_run(h: Harness) -> None:
    await h.publish("c1", jobRunId=7, status="kSuccess", startTimeUsecs=10, endTimeUsecs=20)


async def _page_token(h: Harness) -> str:
    for job in (1, 2, 3):
        await h.publish("c1", jobRunId=job, status="kRunning")
    page = await h.stub.ListRuns(svc.ListRunsRequest(page_size=1))
    assert page.next_page_token
    return page.next_page_token


def _unary(method: str) -> Callable[[Harness, Any], Awaitable[Any]]:
    async def call(h: Harness, request: Any) -> Any:
        return await getattr(h.stub, method)(request)

    return call


async def _watch(h: Harness, request: svc.WatchRunsRequest) -> Any:
    call = h.stub.WatchRuns(request)
    return await call.read()


@dataclass(frozen=True)
class BadRequestCase:
    id: str
    rpc: Callable[[Harness, Any], Awaitable[Any]]
    request: Callable[[Any], Any]
    code: grpc.StatusCode
    field: str | None
    reason: str
    setup: Setup = _no_setup


INVALID = grpc.StatusCode.INVALID_ARGUMENT
PUBLISH, GET, LIST = _unary("PublishRun"), _unary("GetRun"), _unary("ListRuns")

BAD_REQUESTS = [
    BadRequestCase(
        "publish-without-run",
        PUBLISH,
        lambda _: svc.PublishRunRequest(source="c1"),
        INVALID,
        "jobRunId",
        "INVALID_RUN",
    ),
    BadRequestCase(
        "publish-without-jobRunId",
        PUBLISH,
        lambda _: svc.PublishRunRequest(source="c1", run=from_rest({"status": "kRunning"})),
        INVALID,
        "jobRunId",
        "INVALID_RUN",
    ),
    BadRequestCase(
        "publish-end-before-start",
        PUBLISH,
        lambda _: svc.PublishRunRequest(run=from_rest({"jobRunId": 1, "startTimeUsecs": 2_000, "endTimeUsecs": 1_999})),
        INVALID,
        "endTimeUsecs",
        "INVALID_RUN",
    ),
    BadRequestCase(
        "publish-final-then-other-status",
        PUBLISH,
        lambda _: svc.PublishRunRequest(source="c1", run=from_rest({"jobRunId": 7, "status": "kRunning"})),
        grpc.StatusCode.FAILED_PRECONDITION,
        "status",
        "RUN_FINAL",
        _final_run,
    ),
    BadRequestCase(
        "publish-final-then-other-final-status",
        PUBLISH,
        lambda _: svc.PublishRunRequest(source="c1", run=from_rest({"jobRunId": 7, "status": "kFailure"})),
        grpc.StatusCode.FAILED_PRECONDITION,
        "status",
        "RUN_FINAL",
        _final_run,
    ),
    BadRequestCase(
        "publish-final-then-status-unset",
        PUBLISH,
        lambda _: svc.PublishRunRequest(source="c1", run=from_rest({"jobRunId": 7})),
        grpc.StatusCode.FAILED_PRECONDITION,
        "status",
        "RUN_FINAL",
        _final_run,
    ),
    BadRequestCase(
        "get-unknown-run",
        GET,
        lambda _: svc.GetRunRequest(source="c1", job_run_id=404),
        grpc.StatusCode.NOT_FOUND,
        None,
        "RUN_NOT_FOUND",
    ),
    BadRequestCase(
        "get-run-of-other-source",
        GET,
        lambda _: svc.GetRunRequest(source="c2", job_run_id=7),
        grpc.StatusCode.NOT_FOUND,
        None,
        "RUN_NOT_FOUND",
        _final_run,
    ),
    BadRequestCase(
        "list-negative-page-size",
        LIST,
        lambda _: svc.ListRunsRequest(page_size=-1),
        INVALID,
        "pageSize",
        "INVALID_REQUEST",
    ),
    BadRequestCase(
        "list-garbage-page-token",
        LIST,
        lambda _: svc.ListRunsRequest(page_token="not a token!"),
        INVALID,
        "pageToken",
        "INVALID_REQUEST",
    ),
    BadRequestCase(
        "list-base64-but-not-a-token",
        LIST,
        lambda _: svc.ListRunsRequest(page_token="WzEsMl0"),  # base64 of [1,2]
        INVALID,
        "pageToken",
        "INVALID_REQUEST",
    ),
    BadRequestCase(
        "list-token-with-other-filter",
        LIST,
        lambda token: svc.ListRunsRequest(page_token=token, filter=svc.RunFilter(sources=["c1"])),
        INVALID,
        "pageToken",
        "INVALID_REQUEST",
        _page_token,
    ),
    BadRequestCase(
        "watch-negative-start-revision",
        _watch,
        lambda _: svc.WatchRunsRequest(start_revision=-1),
        INVALID,
        "startRevision",
        "INVALID_REQUEST",
    ),
    BadRequestCase(
        "watch-snapshot-with-start-revision",
        _watch,
        lambda _: svc.WatchRunsRequest(include_snapshot=True, start_revision=1),
        INVALID,
        "includeSnapshot",
        "INVALID_REQUEST",
    ),
    BadRequestCase(
        "watch-negative-progress-interval",
        _watch,
        lambda _: svc.WatchRunsRequest(progress_interval_ms=-1),
        INVALID,
        "progressIntervalMs",
        "INVALID_REQUEST",
    ),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case.id for case in BAD_REQUESTS])
@aio_test
async def test_bad_request_is_refused_with_details(case: BadRequestCase) -> None:
    async with serving() as h:
        context = await case.setup(h)
        head_before = h.running.store.head_revision()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await case.rpc(h, case.request(context))
        error = rich_error(caught.value)
        assert error.code == case.code
        assert error.reason == case.reason
        assert error.domain == "shellinfo.v1"
        assert error.message
        assert error.fields == ([case.field] if case.field else [])
        assert h.running.store.head_revision() == head_before, "a refused request recorded something"


@aio_test
async def test_run_not_found_names_the_run_in_metadata() -> None:
    async with serving() as h:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.stub.GetRun(svc.GetRunRequest(source="edge", job_run_id=12))
        assert rich_error(caught.value).metadata == {"source": "edge", "job_run_id": "12"}


@aio_test
async def test_publish_runs_acknowledges_refused_items_and_goes_on() -> None:
    async with serving() as h:
        requests = [
            req("c1", jobRunId=1, status="kSuccess"),  # 0: accepted
            svc.PublishRunsRequest(source="c1"),  # 1: no run at all
            req("c1", status="kRunning"),  # 2: no jobRunId
            req("c1", jobRunId=2, status="kRunning"),  # 3: accepted
            req("c1", jobRunId=1, status="kRunning"),  # 4: run 1 is final
            req("c1", jobRunId=3, startTimeUsecs=5, endTimeUsecs=4),  # 5: end before start
            req("c1", jobRunId=3, startTimeUsecs=5, endTimeUsecs=6),  # 6: accepted
            req("c1", jobRunId=2, status="kRunning"),  # 7: identical to 3: no-op
        ]
        acks = [ack async for ack in h.stub.PublishRuns(iter(requests))]

        assert [ack.index for ack in acks] == list(range(len(requests)))
        refused = {
            ack.index: (ack.error.code, ack.error.reason, [v.field for v in ack.error.field_violations])
            for ack in acks
            if ack.HasField("error")
        }
        assert refused == {
            1: (grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_RUN", ["jobRunId"]),
            2: (grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_RUN", ["jobRunId"]),
            4: (grpc.StatusCode.FAILED_PRECONDITION.value[0], "RUN_FINAL", ["status"]),
            5: (grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_RUN", ["endTimeUsecs"]),
        }
        for index in refused:
            assert acks[index].revision == 0
            assert not acks[index].changed
            assert acks[index].error.message
            assert all(v.description for v in acks[index].error.field_violations)
        accepted = [acks[i] for i in (0, 3, 6)]
        assert all(ack.changed for ack in accepted)
        assert [ack.revision for ack in accepted] == sorted({ack.revision for ack in accepted})
        assert (acks[7].revision, acks[7].changed) == (acks[3].revision, False)

        # Nothing of the refused items was recorded.
        run1 = await h.stub.GetRun(svc.GetRunRequest(source="c1", job_run_id=1))
        assert run1.update.run.status == RunStatus.RUN_STATUS_SUCCESS
        run3 = await h.stub.GetRun(svc.GetRunRequest(source="c1", job_run_id=3))
        assert run3.update.run.end_time_usecs == 6
        assert h.running.store.head_revision() == acks[6].revision


@aio_test
async def test_publish_runs_acknowledges_thousands_in_request_order() -> None:
    async with serving() as h:
        acks = await h.publish_many(numbered(3000))
        assert [ack.index for ack in acks] == list(range(3000))
        assert [ack.revision for ack in acks] == list(range(1, 3001))
        assert all(ack.changed for ack in acks)


@aio_test
async def test_publish_runs_with_no_requests_ends_cleanly() -> None:
    async with serving() as h:
        call = h.stub.PublishRuns(iter(()))
        assert [ack async for ack in call] == []
        assert await call.code() == grpc.StatusCode.OK


@aio_test
async def test_publish_larger_than_max_receive_bytes_is_refused() -> None:
    async with serving(config=ServerConfig(max_receive_bytes=10_000)) as h:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.publish("c1", jobRunId=1, error="x" * 20_000)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert h.running.store.head_revision() == 0


# --- 2. the publish rules ---------------------------------------------------------


@aio_test
async def test_revisions_strictly_increase_across_runs_and_sources() -> None:
    async with serving() as h:
        seen = []
        for i in range(12):
            response = await h.publish(f"s{i % 3}", jobRunId=i % 4, status=NOT_FINAL[i % len(NOT_FINAL)], error=str(i))
            assert response.changed
            seen.append(response.revision)
        assert all(a < b for a, b in itertools.pairwise(seen))
        assert h.running.store.head_revision() == seen[-1]


@aio_test
async def test_identical_republish_is_a_noop_with_the_same_revision() -> None:
    async with serving() as h:
        rest = {"jobRunId": 5, "status": "kRunning", "startTimeUsecs": 100, "runType": "kFull"}
        first = await h.publish("c1", **rest)
        other = await h.publish("c2", **rest)  # same run id, other source: another run
        again = await h.publish("c1", **rest)
        assert first.changed
        assert other.changed
        assert (again.revision, again.changed) == (first.revision, False)
        stored = await h.stub.GetRun(svc.GetRunRequest(source="c1", job_run_id=5))
        assert stored.update.revision == first.revision
        assert h.running.store.head_revision() == other.revision


@pytest.mark.parametrize("final", FINAL)
@aio_test
async def test_final_run_accepts_its_own_status_with_other_fields(final: str) -> None:
    async with serving() as h:
        running = await h.publish("c1", jobRunId=9, status="kRunning", startTimeUsecs=100)
        done = await h.publish("c1", jobRunId=9, status=final, startTimeUsecs=100)
        retried = await h.publish("c1", jobRunId=9, status=final, startTimeUsecs=100)
        amended = await h.publish("c1", jobRunId=9, status=final, startTimeUsecs=100, endTimeUsecs=200, error="late")
        assert running.revision < done.revision < amended.revision
        assert (retried.revision, retried.changed) == (done.revision, False)
        assert amended.changed
        stored = await h.stub.GetRun(svc.GetRunRequest(source="c1", job_run_id=9))
        assert stored.update.run == from_rest(
            {"jobRunId": 9, "status": final, "startTimeUsecs": 100, "endTimeUsecs": 200, "error": "late"}
        )


@aio_test
async def test_runs_that_are_not_final_may_change_status_freely() -> None:
    async with serving() as h:
        for status in [*NOT_FINAL, "kAccepted", "kSuccess"]:
            assert (await h.publish("c1", jobRunId=1, status=status)).changed


# --- ListRuns ---------------------------------------------------------------------


@aio_test
async def test_list_runs_pages_in_key_order_with_a_filter() -> None:
    async with serving() as h:
        requests = [
            req(source, jobRunId=job, status=status)
            for job in (30, 4, 200, 17, 1)
            for source, status in (("b", "kRunning"), ("a", "kRunning"), ("", "kSuccess"))
        ]
        await h.publish_many(requests)

        async def all_pages(flt: svc.RunFilter | None, size: int) -> list[tuple[str, int]]:
            keys: list[tuple[str, int]] = []
            token = ""
            while True:
                page = await h.stub.ListRuns(svc.ListRunsRequest(filter=flt, page_size=size, page_token=token))
                assert len(page.updates) <= (size or 100)
                keys += [(u.source, u.run.job_run_id) for u in page.updates]
                token = page.next_page_token
                if not token:
                    return keys

        everything = sorted((r.source, r.run.job_run_id) for r in requests)
        assert await all_pages(None, 4) == everything
        assert await all_pages(None, 0) == everything  # 0 means 100
        running = svc.RunFilter(statuses=[RunStatus.RUN_STATUS_RUNNING])
        assert await all_pages(running, 2) == [k for k in everything if k[0] != ""]
        assert await all_pages(svc.RunFilter(sources=[""], job_run_ids=[4, 17, 999]), 1) == [("", 4), ("", 17)]


@aio_test
async def test_list_runs_page_size_is_capped_at_1000() -> None:
    async with serving() as h:
        await h.publish_many(numbered(1001))
        first = await h.stub.ListRuns(svc.ListRunsRequest(page_size=5000))
        assert len(first.updates) == 1000
        assert first.next_page_token
        second = await h.stub.ListRuns(svc.ListRunsRequest(page_size=5000, page_token=first.next_page_token))
        assert [u.run.job_run_id for u in second.updates] == [1001]
        assert not second.next_page_token
        default = await h.stub.ListRuns(svc.ListRunsRequest())
        assert len(default.updates) == 100


# --- 3. WatchRuns -----------------------------------------------------------------


@aio_test
async def test_watch_from_now_gets_live_updates_one_per_response() -> None:
    async with serving() as h:
        await h.publish("c1", jobRunId=1, status="kRunning")  # before the watch: not sent
        call = h.stub.WatchRuns(svc.WatchRunsRequest(progress_interval_ms=100))
        # The first progress response proves the watch is registered.
        first = await next_response(call)
        assert (list(first.updates), first.revision) == ([], 1)
        live: list[svc.WatchRunsResponse] = [first]
        for job in (2, 3, 4):
            published = await h.publish("c1", jobRunId=job, status="kRunning")
            while True:  # progress responses may come in between
                response = await next_response(call)
                live.append(response)
                if response.updates:
                    break
            # Published one at a time, each update goes out alone, at once.
            assert [u.revision for u in response.updates] == [published.revision]
            assert response.updates[0].run.job_run_id == job
            assert response.updates[0].source == "c1"
            assert response.updates[0].accepted_time_usecs > 0
            assert response.revision == published.revision
        check_watch_invariants(live)
        call.cancel()


@aio_test
async def test_watch_backlog_is_sent_in_batches_in_order_exactly_once() -> None:
    config = ServerConfig(max_batch_updates=400)
    async with serving(config=config) as h:
        await h.publish_many(numbered(3000))
        call = h.stub.WatchRuns(svc.WatchRunsRequest(start_revision=1))
        responses = await read_until(call, 3000)
        carrying = [r for r in responses if r.updates]
        assert revisions(responses) == list(range(1, 3001))
        assert all(len(r.updates) <= 400 for r in carrying)
        assert len(carrying) <= 3000 // 400 + 2, "the backlog was not batched"
        check_watch_invariants(responses, start=1)
        # The catch-up ends with a response of its own that carries no updates.
        end = await next_response(call)
        assert (list(end.updates), end.revision) == ([], 3000)
        # Then live, one at a time again.
        published = await h.publish("c1", jobRunId=1, status="kRunning")
        response = await next_response(call)
        assert [u.revision for u in response.updates] == [published.revision]
        call.cancel()


@aio_test
async def test_watch_batches_respect_max_batch_bytes() -> None:
    config = ServerConfig(max_batch_bytes=8_000)
    async with serving(config=config) as h:
        await h.publish_many(numbered(200, pad=1_000))
        call = h.stub.WatchRuns(svc.WatchRunsRequest(start_revision=1))
        responses = await read_until(call, 200)
        assert revisions(responses) == list(range(1, 201))
        for response in responses:
            assert sum(u.ByteSize() for u in response.updates) <= 8_000
        assert max(len(r.updates) for r in responses) > 1
        call.cancel()


@aio_test
async def test_watch_catching_up_while_updates_keep_coming_has_no_gap_or_duplicate() -> None:
    async with serving(config=ServerConfig(max_batch_updates=100)) as h:
        await h.publish_many(numbered(3000))
        call = h.stub.WatchRuns(svc.WatchRunsRequest(start_revision=1))
        responses = [await next_response(call)]  # the catch-up has begun
        more = asyncio.ensure_future(h.publish_many(numbered(500, source="late")))
        responses += await read_until(call, 3500)
        assert [ack.revision for ack in await more] == list(range(3001, 3501))
        assert revisions(responses) == list(range(1, 3501))
        check_watch_invariants(responses, start=1)
        call.cancel()


@aio_test
async def test_watch_start_revision_is_inclusive() -> None:
    async with serving() as h:
        await h.publish_many(numbered(10))
        call = h.stub.WatchRuns(svc.WatchRunsRequest(start_revision=5))
        responses = await read_until(call, 10)
        assert revisions(responses) == [5, 6, 7, 8, 9, 10]
        call.cancel()


@aio_test
async def test_watch_resumes_with_revision_plus_one_without_gap_or_duplicate() -> None:
    async with serving(config=ServerConfig(max_batch_updates=3)) as h:
        await h.publish_many(numbered(10))
        first = h.stub.WatchRuns(svc.WatchRunsRequest(start_revision=1))
        received = []
        for _ in range(2):  # read part of the backlog, then disconnect
            response = await next_response(first)
            received += [u.revision for u in response.updates]
            resume = response.revision + 1
        first.cancel()
        assert received == [1, 2, 3, 4, 5, 6]

        await h.publish_many(numbered(5, first=100))  # published while disconnected: 11..15
        second = h.stub.WatchRuns(svc.WatchRunsRequest(start_revision=resume))
        responses = await read_until(second, 15)
        received += revisions(responses)
        assert received == list(range(1, 16))
        # Caught up: resuming from the head + 1 sends the next update and nothing before it.
        third = h.stub.WatchRuns(svc.WatchRunsRequest(start_revision=responses[-1].revision + 1))
        second.cancel()
        published = await h.publish("c9", jobRunId=1)
        response = await next_response(third)
        if not response.updates:  # the end of an empty catch-up may come first; it sends nothing older
            assert response.revision <= 15
            response = await next_response(third)
        assert [u.revision for u in response.updates] == [published.revision] == [16]
        third.cancel()


@aio_test
async def test_watch_snapshot_then_marker_then_live() -> None:
    async with serving(config=ServerConfig(max_batch_updates=2)) as h:
        await h.publish("c1", jobRunId=1, status="kAccepted")  # r1
        await h.publish("c1", jobRunId=2, status="kRunning")  # r2
        await h.publish("c1", jobRunId=1, status="kRunning")  # r3
        await h.publish("c2", jobRunId=3, status="kRunning")  # r4
        await h.publish("c1", jobRunId=2, status="kSuccess")  # r5
        call = h.stub.WatchRuns(svc.WatchRunsRequest(include_snapshot=True))
        snapshot = []
        while True:
            response = await next_response(call)
            if response.snapshot_complete:
                marker = response
                break
            assert len(response.updates) <= 2
            snapshot.append(response)
        # The latest state of every run, in revision order.
        assert revisions(snapshot) == [3, 4, 5]
        assert [(u.source, u.run.job_run_id, u.run.status) for r in snapshot for u in r.updates] == [
            ("c1", 1, RunStatus.RUN_STATUS_RUNNING),
            ("c2", 3, RunStatus.RUN_STATUS_RUNNING),
            ("c1", 2, RunStatus.RUN_STATUS_SUCCESS),
        ]
        assert (list(marker.updates), marker.revision) == ([], 5)
        check_watch_invariants([*snapshot, marker])

        published = await h.publish("c1", jobRunId=4, status="kAccepted")
        response = await next_response(call)
        assert [u.revision for u in response.updates] == [published.revision] == [6]
        assert not response.snapshot_complete
        call.cancel()


@aio_test
async def test_watch_snapshot_of_an_empty_service_is_just_the_marker() -> None:
    async with serving() as h:
        call = h.stub.WatchRuns(svc.WatchRunsRequest(include_snapshot=True))
        marker = await next_response(call)
        assert marker.snapshot_complete
        assert (list(marker.updates), marker.revision) == ([], 0)
        published = await h.publish("c1", jobRunId=1)
        response = await next_response(call)
        assert [u.revision for u in response.updates] == [published.revision]
        call.cancel()


@aio_test
async def test_watch_snapshot_with_filter_and_resume_after_marker() -> None:
    async with serving() as h:
        await h.publish("c1", jobRunId=1, status="kRunning")  # r1
        await h.publish("c1", jobRunId=2, status="kSuccess")  # r2
        await h.publish("c2", jobRunId=3, status="kRunning")  # r3
        flt = svc.RunFilter(statuses=[RunStatus.RUN_STATUS_RUNNING])
        call = h.stub.WatchRuns(svc.WatchRunsRequest(filter=flt, include_snapshot=True))
        first = await next_response(call)
        marker = first if first.snapshot_complete else await next_response(call)
        assert revisions([first]) == ([] if first.snapshot_complete else [1, 3])
        assert marker.snapshot_complete
        assert marker.revision == 3
        call.cancel()

        await h.publish("c1", jobRunId=1, status="kFailure")  # r4: not matching any more
        await h.publish("c1", jobRunId=4, status="kRunning")  # r5
        resumed = h.stub.WatchRuns(svc.WatchRunsRequest(filter=flt, start_revision=marker.revision + 1))
        responses = await read_until(resumed, 5)
        assert revisions(responses) == [5]
        resumed.cancel()


def _dataset() -> list[svc.PublishRunsRequest]:
    statuses = ["kAccepted", "kRunning", "kSuccess", "kFailure", "kOnHold"]
    run_types = ["kRegular", "kFull", "kLog", "kSystem"]
    return [
        req(("a", "b", "c")[i % 3], jobRunId=i, status=statuses[i % 5], runType=run_types[i % 4]) for i in range(1, 41)
    ] + [
        req("a", jobRunId=99),  # no status, no runType
        req("", jobRunId=100, status="kRunning", runType="kLog"),
    ]


FILTERS = {
    "sources": svc.RunFilter(sources=["a"]),
    "sources-empty-string": svc.RunFilter(sources=[""]),
    "job_run_ids": svc.RunFilter(job_run_ids=[3, 7, 11, 99, 1234]),
    "statuses": svc.RunFilter(statuses=[RunStatus.RUN_STATUS_RUNNING, RunStatus.RUN_STATUS_SUCCESS]),
    "run_types": svc.RunFilter(run_types=[RunType.RUN_TYPE_LOG]),
    "all-lists-combine-with-and": svc.RunFilter(
        sources=["a", "b"], statuses=[RunStatus.RUN_STATUS_RUNNING], run_types=[RunType.RUN_TYPE_FULL]
    ),
}


def _matches(flt: svc.RunFilter, source: str, run: ProtectionShellInfo) -> bool:
    """The filter semantics as the proto states them, written independently."""
    return (
        (not flt.sources or source in flt.sources)
        and (not flt.job_run_ids or run.job_run_id in flt.job_run_ids)
        and (not flt.statuses or (run.HasField("status") and run.status in flt.statuses))
        and (not flt.run_types or (run.HasField("run_type") and run.run_type in flt.run_types))
    )


@pytest.mark.parametrize("name", list(FILTERS))
@aio_test
async def test_watch_filter_sends_matching_updates_and_progress_past_the_rest(name: str) -> None:
    flt = FILTERS[name]
    async with serving() as h:
        dataset = _dataset()
        acks = await h.publish_many(dataset)
        head = acks[-1].revision
        expected = [ack.revision for ack, r in zip(acks, dataset, strict=True) if _matches(flt, r.source, r.run)]
        assert 0 < len(expected) < len(dataset)

        # History: only the matching updates, then the resume point moves to the head.
        call = h.stub.WatchRuns(svc.WatchRunsRequest(filter=flt, start_revision=1, progress_interval_ms=100))
        responses = await read_until(call, head)
        assert revisions(responses) == expected
        assert all(_matches(flt, u.source, u.run) for r in responses for u in r.updates)
        check_watch_invariants(responses, start=1)

        # Live: a non-matching update is skipped, but progress moves past it.
        miss = await h.publish("zz", jobRunId=5000, status="kCanceling", runType="kRegular")
        assert not _matches(flt, "zz", from_rest({"jobRunId": 5000, "status": "kCanceling", "runType": "kRegular"}))
        progress = await read_until(call, miss.revision)
        assert revisions(progress) == []
        assert progress[-1].revision == miss.revision

        # And a matching one arrives.
        template = next(r for r in dataset if _matches(flt, r.source, r.run))
        changed = ProtectionShellInfo()
        changed.CopyFrom(template.run)
        changed.error = "changed"
        hit = await h.stub.PublishRun(svc.PublishRunRequest(source=template.source, run=changed))
        live = await read_until(call, hit.revision)
        assert revisions(live) == [hit.revision]
        call.cancel()


@aio_test
async def test_watch_sends_progress_while_idle() -> None:
    async with serving() as h:
        await h.publish_many(numbered(2))
        call = h.stub.WatchRuns(svc.WatchRunsRequest(progress_interval_ms=100))
        for _ in range(3):
            response = await next_response(call)
            assert (list(response.updates), response.revision, response.snapshot_complete) == ([], 2, False)
        call.cancel()


@aio_test
async def test_watch_progress_interval_below_minimum_is_accepted() -> None:
    async with serving() as h:
        call = h.stub.WatchRuns(svc.WatchRunsRequest(progress_interval_ms=1))
        response = await next_response(call)
        assert (list(response.updates), response.revision) == ([], 0)
        call.cancel()


# --- sizes: what the service accepts, a client with gRPC defaults must be able to read

CLIENT_DEFAULT_MAX_RECEIVE = 4 * 1024 * 1024


@aio_test
async def test_list_runs_pages_fit_a_default_client() -> None:
    async with serving() as h:
        await h.publish_many(numbered(1000, pad=5_000))
        keys = []
        token = ""
        while True:
            page = await h.stub.ListRuns(svc.ListRunsRequest(page_size=1000, page_token=token))
            keys += [u.run.job_run_id for u in page.updates]
            token = page.next_page_token
            if not token:
                break
        assert keys == list(range(1, 1001))


def _largest_accepted_request() -> svc.PublishRunRequest:
    """The largest PublishRunRequest under the server's default 4 MB receive limit."""
    request = svc.PublishRunRequest(source="c1", run=from_rest({"jobRunId": 1, "status": "kRunning"}))
    request.run.error = "x" * (CLIENT_DEFAULT_MAX_RECEIVE - request.ByteSize() - 8)
    while request.ByteSize() < CLIENT_DEFAULT_MAX_RECEIVE:
        request.run.error += "x"
    request.run.error = request.run.error[:-1]
    assert request.ByteSize() == CLIENT_DEFAULT_MAX_RECEIVE - 1
    return request


@aio_test
async def test_an_accepted_run_can_be_read_back_by_a_default_client() -> None:
    async with serving() as h:
        refused = None
        try:
            await h.stub.PublishRun(_largest_accepted_request())
        except grpc.aio.AioRpcError as exc:  # refusing it is fine too
            refused = exc.code()
        if refused is not None:
            assert refused in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
            return
        await h.stub.GetRun(svc.GetRunRequest(source="c1", job_run_id=1))
        call = h.stub.WatchRuns(svc.WatchRunsRequest(start_revision=1))
        assert revisions([await next_response(call)]) == [1]
        call.cancel()


# --- 4. retention -------------------------------------------------------------------


@aio_test
async def test_watch_before_retained_history_is_out_of_range() -> None:
    async with serving(MemoryStore(retention=Retention(max_updates=10))) as h:
        await h.publish_many(numbered(30))
        for start in (1, 20):
            error, responses = await watch_error(h.stub.WatchRuns(svc.WatchRunsRequest(start_revision=start)))
            assert responses == []
            assert error.code == grpc.StatusCode.OUT_OF_RANGE
            assert error.reason == "HISTORY_EXPIRED"
            assert error.metadata["oldest_revision"] == "21"
            assert error.metadata["requested_revision"] == str(start)

        call = h.stub.WatchRuns(svc.WatchRunsRequest(start_revision=21))
        assert revisions(await read_until(call, 30)) == list(range(21, 31))
        call.cancel()
        # The latest state of every run is kept whatever the history retains.
        snapshot = h.stub.WatchRuns(svc.WatchRunsRequest(include_snapshot=True))
        assert revisions(await read_until(snapshot, 30)) == list(range(1, 31))
        snapshot.cancel()
        assert (await h.stub.GetRun(svc.GetRunRequest(source="bulk", job_run_id=1))).update.revision == 1


# --- 5. slow watchers -----------------------------------------------------------------

# A watcher whose client does not read stalls the server's writes to it once
# the HTTP/2 windows are full. Its own connection with a small window and no
# BDP probing makes that happen after a few dozen updates of ~1 kB, far from
# the 2000 published, on any machine.
SLOW_READER = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16_384)]


@aio_test
async def test_slow_watcher_is_cut_off_without_blocking_publishers_or_others() -> None:
    total = 2000
    async with serving(config=ServerConfig(max_watch_queue=50)) as h:
        slow = h.new_channel(SLOW_READER).WatchRuns(svc.WatchRunsRequest(include_snapshot=True))
        fast = h.new_channel().WatchRuns(svc.WatchRunsRequest(include_snapshot=True))
        assert (await next_response(slow)).snapshot_complete  # both are registered now
        assert (await next_response(fast)).snapshot_complete

        fast_updates: list[int] = []

        async def read_fast() -> None:
            while len(fast_updates) < total:
                response = await next_response(fast)
                fast_updates.extend(u.revision for u in response.updates)

        reader = asyncio.create_task(read_fast())
        publisher = h.new_channel()
        acks = [ack async for ack in publisher.PublishRuns(iter(numbered(total, pad=1_000)))]
        # Every ack arrived while the slow watcher has not read a single update.
        assert [(a.index, a.revision, a.HasField("error")) for a in acks] == [(i, i + 1, False) for i in range(total)]
        await reader
        assert fast_updates == list(range(1, total + 1))  # all, in order, once

        error, responses = await watch_error(slow)
        got = revisions(responses)
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.reason == "WATCHER_TOO_SLOW"
        assert len(got) < total
        assert got == list(range(1, len(got) + 1))  # what it did get has no gap
        last = responses[-1].revision if responses else 0
        assert last == (got[-1] if got else 0)
        assert error.metadata["last_revision"] == str(last)

        # It resumes where it was cut off and misses nothing.
        resumed = h.stub.WatchRuns(svc.WatchRunsRequest(start_revision=last + 1))
        assert revisions(await read_until(resumed, total)) == list(range(last + 1, total + 1))
        resumed.cancel()
        fast.cancel()


@aio_test
async def test_a_burst_in_one_commit_does_not_end_a_watcher_that_keeps_up() -> None:
    async with serving(config=ServerConfig(max_watch_queue=50)) as h:
        call = h.stub.WatchRuns(svc.WatchRunsRequest(include_snapshot=True))
        assert (await next_response(call)).snapshot_complete
        # What PublishRuns does when requests wait while the store commits:
        # one publish_batch of everything queued, up to 1000.
        items = [(r.source, r.run) for r in numbered(100)]
        await h.running.store.publish_batch(items)
        responses = await read_until(call, 100)
        assert revisions(responses) == list(range(1, 101))
        call.cancel()


# --- 6. graceful shutdown ---------------------------------------------------------------


class GatedStore(MemoryStore):
    """A MemoryStore whose publishes can be held at a gate, to keep a call in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.closed = False

    async def publish_batch(self, items: Sequence[tuple[str, ProtectionShellInfo]]) -> list[Any]:
        if self.hold:
            self.entered.set()
            await self.gate.wait()
        return await super().publish_batch(items)

    async def close(self) -> None:
        self.closed = True
        await super().close()


@aio_test
async def test_graceful_shutdown() -> None:
    store = GatedStore()
    async with serving(store) as h:
        watcher = h.stub.WatchRuns(svc.WatchRunsRequest(include_snapshot=True))
        assert (await next_response(watcher)).snapshot_complete
        stream = h.stub.PublishRuns()
        await stream.write(req("agent", jobRunId=1, status="kRunning"))
        assert (await next_response(stream)).revision == 1
        assert revisions([await next_response(watcher)]) == [1]

        # A unary publish held inside the store: in flight when shutdown starts.
        store.hold = True
        unary = asyncio.ensure_future(h.publish("agent", jobRunId=2, status="kRunning"))
        await asyncio.wait_for(store.entered.wait(), 5)

        # Observe the server at the moment stop() reaches grpc's own stop.
        seen: dict[str, Any] = {}
        stopping = asyncio.Event()
        real_server = h.running.server

        async def observed_stop(grace: float | None) -> None:
            h.running.server = real_server  # observe once
            seen["grace"] = grace
            seen["health"] = [
                (await h.health.Check(health_pb2.HealthCheckRequest(service=name))).status
                for name in ("", SERVICE_NAME)
            ]
            late = h.stub.WatchRuns(svc.WatchRunsRequest(include_snapshot=True))
            seen["late_watch"], _ = await watch_error(late)
            stopping.set()
            await real_server.stop(grace)

        h.running.server = _StopObserver(h.running.server, observed_stop)
        stop = asyncio.ensure_future(h.running.stop(grace=5))

        # The open watch ends with UNAVAILABLE and where to resume.
        error, responses = await watch_error(watcher)
        assert responses == []
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.reason == "SERVER_SHUTTING_DOWN"
        assert error.metadata["last_revision"] == "1"

        await asyncio.wait_for(stopping.wait(), 5)
        assert seen["grace"] == 5
        assert seen["health"] == [NOT_SERVING, NOT_SERVING]
        assert seen["late_watch"].code == grpc.StatusCode.UNAVAILABLE
        assert seen["late_watch"].reason == "SERVER_SHUTTING_DOWN"

        # In-flight calls finish: the held unary publish, and the open stream.
        store.gate.set()
        assert (await asyncio.wait_for(unary, 5)).revision == 2
        await stream.write(req("agent", jobRunId=1, status="kSuccess"))
        ack = await next_response(stream)
        assert (ack.index, ack.revision, ack.HasField("error")) == (1, 3, False)
        await stream.done_writing()
        assert await asyncio.wait_for(stream.code(), 5) == grpc.StatusCode.OK

        await asyncio.wait_for(stop, 6)
        assert store.closed
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.stub.GetRun(svc.GetRunRequest(source="agent", job_run_id=1), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


class _StopObserver:
    """Stands in for the grpc.aio.Server in a RunningServer, to run code when stop() is called."""

    def __init__(self, server: Any, observed: Callable[[float | None], Awaitable[None]]) -> None:
        self._observed = observed
        self._server = server

    def stop(self, grace: float | None) -> Awaitable[None]:
        return self._observed(grace)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


# --- 7. health ---------------------------------------------------------------------


@aio_test
async def test_health_check_serving() -> None:
    async with serving() as h:
        for name in ("", SERVICE_NAME, "shellinfo.v1.RunUpdateService"):
            response = await h.health.Check(health_pb2.HealthCheckRequest(service=name))
            assert response.status == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- 9. reflection, as buf curl sees it ---------------------------------------------


needs_buf = pytest.mark.skipif(BUF is None, reason="buf is not installed (pip install buf-bin)")


@needs_buf
@aio_test
async def test_buf_curl_lists_methods_through_reflection() -> None:
    async with serving() as h:
        code, out, err = await buf_curl("--list-methods", f"http://{h.target}")
        assert code == 0, err
        methods = set(out.split())
        assert {
            f"{SERVICE_NAME}/{name}" for name in ("PublishRun", "PublishRuns", "GetRun", "ListRuns", "WatchRuns")
        } <= methods
        code, out, err = await buf_curl("--list-services", f"http://{h.target}")
        assert code == 0, err
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(out.split())


@needs_buf
@aio_test
async def test_buf_curl_calls_get_run_as_json() -> None:
    async with serving() as h:
        await h.publish("c1", jobRunId=1, status="kSuccess", startTimeUsecs=10, endTimeUsecs=20)
        url = f"http://{h.target}/{SERVICE_NAME}/GetRun"
        code, out, err = await buf_curl("-d", '{"source":"c1","jobRunId":"1"}', url)
        assert code == 0, err
        expected = await h.stub.GetRun(svc.GetRunRequest(source="c1", job_run_id=1))
        assert json.loads(out) == json_format.MessageToDict(expected)
        assert json.loads(out)["update"]["run"]["status"] == "RUN_STATUS_SUCCESS"

        # A refusal is the gRPC code, shifted three bits left, as buf's exit status.
        code, _, err = await buf_curl("-d", '{"source":"c1","jobRunId":"2"}', url)
        assert code == grpc.StatusCode.NOT_FOUND.value[0] << 3
        assert "not_found" in err.lower()
