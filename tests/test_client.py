"""The blocking and asyncio clients against the real server on 127.0.0.1.

Servers run on an asyncio loop in a background thread (:class:`ServerHost`);
the blocking client is called from the test thread. Watches are iterated on a
helper thread (:class:`Collector`) so that every wait is bounded.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from certs import make_pki

from shellinfo_grpc import ProtectionShellInfo, RestDecodeError, RunStatus, from_rest, to_rest
from shellinfo_grpc._gen.shellinfo.v1.protection_job_pb2 import ProtectionJob
from shellinfo_grpc.client import (
    AsyncRunUpdateClient,
    PublishResult,
    ReconnectPolicy,
    RunUpdateClient,
    RunWatch,
    WatchEvent,
)
from shellinfo_grpc.errors import ConfigurationError, HistoryExpired, RevisionInFuture, RunRejected, ServiceError
from shellinfo_grpc.run_instance import job_to_rest
from shellinfo_grpc.server import RunningServer, ServerConfig, TlsConfig, create_server
from shellinfo_grpc.stores import Retention, Store
from shellinfo_grpc.stores.memory import MemoryStore

WAIT = 8.0  # the longest any single wait in these tests may take, in seconds


# --- fixtures and helpers -------------------------------------------------------------


class ServerHost:
    """An asyncio event loop on a thread, where servers start and stop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self.thread.start()
        self.running: list[RunningServer] = []

    def call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(WAIT)

    def start(self, store: Store, config: ServerConfig | None = None, *, port: int = 0) -> RunningServer:
        running: RunningServer = self.call(create_server(f"127.0.0.1:{port}", store, config))
        self.running.append(running)
        return running

    def stop(self, running: RunningServer) -> None:
        self.running.remove(running)
        self.call(running.stop(grace=1.0))

    def publish_direct(self, store: Store, items: list[tuple[str, dict[str, Any]]]) -> None:
        """Commit updates straight into a store, in one batch (no server needed)."""
        self.call(store.publish_batch([(source, from_rest(run)) for source, run in items]))

    def publish_commits(self, store: Store, items: list[tuple[str, dict[str, Any]]]) -> None:
        """Commit updates one commit each, all in one turn of the server's loop.

        MemoryStore commits without suspending, so no watcher can take
        anything from its queue between these commits: a watcher with a queue
        bound below len(items) overflows, as one that does not read would.
        """

        async def commit_each() -> None:
            for source, run in items:
                await store.publish_batch([(source, from_rest(run))])

        self.call(commit_each())

    def close(self) -> None:
        for running in list(self.running):
            self.stop(running)
        self.call(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture
def host() -> Iterator[ServerHost]:
    server_host = ServerHost()
    yield server_host
    server_host.close()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def server(host: ServerHost, store: MemoryStore) -> RunningServer:
    return host.start(store)


@pytest.fixture
def address(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def client(address: str) -> Iterator[RunUpdateClient]:
    with RunUpdateClient(address, timeout=WAIT) as c:
        yield c


def run(job_run_id: int, status: str = "kRunning", **extra: Any) -> dict[str, Any]:
    """A REST ProtectionShellInfo dict."""
    return {"jobRunId": job_run_id, "status": status, **extra}


_END = object()


class Collector:
    """Iterates a watch on a thread, so that the test waits for events with a bound."""

    def __init__(self, watch: RunWatch, *, delay: float = 0.0) -> None:
        self.watch = watch
        self.delay = delay
        self.items: queue.Queue[object] = queue.Queue()
        self.thread = threading.Thread(target=self._consume, name="watch-consumer", daemon=True)
        self.thread.start()

    def _consume(self) -> None:
        try:
            for event in self.watch:
                self.items.put(event)
                if self.delay:
                    time.sleep(self.delay)  # a slow consumer
        except BaseException as exc:  # handed to the test thread
            self.items.put(exc)
        else:
            self.items.put(_END)

    def _next(self) -> object:
        try:
            return self.items.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail(f"the watch delivered nothing within {WAIT} s")

    def take(self, count: int) -> list[WatchEvent]:
        events: list[WatchEvent] = []
        while len(events) < count:
            item = self._next()
            if isinstance(item, BaseException):
                raise item
            assert item is not _END, f"the watch ended after {len(events)} of {count} events"
            assert isinstance(item, WatchEvent)
            events.append(item)
        return events

    def error(self) -> BaseException:
        item = self._next()
        assert isinstance(item, BaseException), f"expected an error, got {item!r}"
        return item

    def close(self) -> None:
        self.watch.close()  # from another thread than the one iterating
        self.thread.join(WAIT)
        assert not self.thread.is_alive()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def revisions(events: list[WatchEvent]) -> list[int]:
    return [event.revision for event in events]


# --- publish, get, list -------------------------------------------------------------------


def test_publish_and_get_accept_rest_dicts_and_messages(client: RunUpdateClient) -> None:
    first = client.publish(run(1, startTimeUsecs=10), source="c1")
    assert first == PublishResult(revision=1, changed=True)
    assert client.publish(run(1, startTimeUsecs=10), source="c1") == PublishResult(revision=1, changed=False)

    message = ProtectionShellInfo(job_run_id=2, status=RunStatus.RUN_STATUS_RUNNING)
    assert client.publish(message) == PublishResult(revision=2, changed=True)

    update = client.get(1, source="c1")
    assert (update.source, update.revision) == ("c1", 1)
    assert to_rest(update.run) == run(1, startTimeUsecs=10)
    assert update.accepted_time_usecs > 0
    assert client.get(2).run == message  # the default source is ""


def test_publish_propagates_a_rest_decode_error(client: RunUpdateClient) -> None:
    with pytest.raises(RestDecodeError) as info:
        client.publish({"jobRunId": "seven"})
    assert info.value.field == "jobRunId"


def test_list_follows_pages_and_filters_by_rest_spellings(client: RunUpdateClient) -> None:
    runs = [
        ("c2", run(1, "kSuccess", runType="kFull")),
        ("c1", run(3, "kRunning", runType="kRegular")),
        ("c1", run(1, "kSuccess", runType="kRegular")),
        ("c1", run(2, "kFailure", runType="kFull")),
        ("c2", run(2, "kRunning", runType="kLog")),
    ]
    for source, data in runs:
        client.publish(data, source=source)

    everything = list(client.list(page_size=2))  # three pages
    assert [(u.source, u.run.job_run_id) for u in everything] == [("c1", 1), ("c1", 2), ("c1", 3), ("c2", 1), ("c2", 2)]

    def keys(**flt: Any) -> list[tuple[str, int]]:
        return [(u.source, u.run.job_run_id) for u in client.list(page_size=2, **flt)]

    assert keys(statuses=["kSuccess"]) == [("c1", 1), ("c2", 1)]
    assert keys(statuses="kSuccess") == [("c1", 1), ("c2", 1)]  # one bare value
    assert keys(statuses=[RunStatus.RUN_STATUS_FAILURE, "kRunning"]) == [("c1", 2), ("c1", 3), ("c2", 2)]
    assert keys(run_types=["kFull"]) == [("c1", 2), ("c2", 1)]
    assert keys(sources="c2", run_types=["kFull", "kLog"]) == [("c2", 1), ("c2", 2)]
    assert keys(job_run_ids=[2], statuses=["kRunning"]) == [("c2", 2)]
    assert keys(statuses=["kCanceled"]) == []

    with pytest.raises(RestDecodeError) as info:
        client.list(statuses=["kDone"])
    assert info.value.field == "status"
    with pytest.raises(RestDecodeError) as info:
        client.list(run_types=["kSuccess"])
    assert info.value.field == "runType"


# --- publish_many ----------------------------------------------------------------------------


def test_publish_many_yields_results_in_order_and_goes_on_after_a_refusal(client: RunUpdateClient) -> None:
    client.publish(run(9, "kSuccess"), source="a")
    items = [
        run(1),  # under the default source
        ("b", run(1)),
        {"status": "kRunning"},  # no jobRunId
        ("a", run(9, "kRunning")),  # final status changed
        ProtectionShellInfo(job_run_id=2),
        run(1),  # unchanged
    ]
    results = list(client.publish_many(items, source="a"))
    assert len(results) == len(items)
    assert results[0] == PublishResult(2, True)
    assert results[1] == PublishResult(3, True)
    missing, final = results[2], results[3]
    assert isinstance(missing, RunRejected)
    assert (missing.code, missing.reason, missing.field) == ("INVALID_ARGUMENT", "INVALID_RUN", "jobRunId")
    assert isinstance(final, RunRejected)
    assert (final.code, final.reason, final.field) == ("FAILED_PRECONDITION", "RUN_FINAL", "status")
    assert results[4] == PublishResult(4, True)
    assert results[5] == PublishResult(2, False)
    assert client.get(1, source="b").revision == 3


def test_publish_many_raises_a_bad_item_after_the_results_before_it(client: RunUpdateClient) -> None:
    results: list[object] = []
    with pytest.raises(RestDecodeError) as info:
        results.extend(client.publish_many([run(1), run(2), {"jobRunId": "three"}, run(3)]))
    assert info.value.field == "jobRunId"
    assert results == [PublishResult(1, True), PublishResult(2, True)]
    with pytest.raises(ServiceError) as missing:
        client.get(3)
    assert missing.value.code == "NOT_FOUND"


# --- error mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prior", "data", "code", "reason", "field"),
    [
        pytest.param([], {"status": "kRunning"}, "INVALID_ARGUMENT", "INVALID_RUN", "jobRunId", id="missing-jobRunId"),
        pytest.param(
            [],
            run(1, startTimeUsecs=200, endTimeUsecs=100),
            "INVALID_ARGUMENT",
            "INVALID_RUN",
            "endTimeUsecs",
            id="end-before-start",
        ),
        pytest.param(
            [run(1, "kSuccess")], run(1, "kFailure"), "FAILED_PRECONDITION", "RUN_FINAL", "status", id="final-status"
        ),
    ],
)
def test_refused_publish_raises_run_rejected(
    client: RunUpdateClient, prior: list[dict[str, Any]], data: dict[str, Any], code: str, reason: str, field: str
) -> None:
    for earlier in prior:
        client.publish(earlier)
    with pytest.raises(RunRejected) as info:
        client.publish(data)
    error = info.value
    assert (error.code, error.reason, error.field) == (code, reason, field)
    assert error.message
    assert isinstance(error.__cause__, grpc.RpcError)


def test_get_of_a_missing_run_is_not_found(client: RunUpdateClient) -> None:
    with pytest.raises(ServiceError) as info:
        client.get(42, source="nowhere")
    error = info.value
    assert not isinstance(error, RunRejected)
    assert (error.code, error.reason) == ("NOT_FOUND", "RUN_NOT_FOUND")
    assert error.metadata == {"source": "nowhere", "job_run_id": "42"}
    assert isinstance(error.__cause__, grpc.RpcError)


def test_invalid_list_and_watch_arguments_are_service_errors(client: RunUpdateClient) -> None:
    with pytest.raises(ServiceError) as info:
        list(client.list(page_size=-1))
    assert (info.value.code, info.value.field) == ("INVALID_ARGUMENT", "pageSize")
    assert not isinstance(info.value, RunRejected)
    with client.watch(start_revision=3, include_snapshot=True) as watch, pytest.raises(ServiceError) as info:
        next(watch)
    assert (info.value.code, info.value.field) == ("INVALID_ARGUMENT", "includeSnapshot")


# --- jobs ---------------------------------------------------------------------------------------


DAILY = {"jobId": 7, "jobName": "vm-daily", "jobUid": {"clusterId": 1, "clusterIncarnationId": 2, "id": 7}}


def test_publish_carries_the_job_and_keeps_it_when_a_publish_has_none(client: RunUpdateClient) -> None:
    assert client.publish(run(1), source="c1", job=DAILY) == PublishResult(1, True)
    assert job_to_rest(client.get(1, source="c1").job) == DAILY
    # The same run without a job: no change, the job stays.
    assert client.publish(run(1), source="c1") == PublishResult(1, False)
    assert client.publish(run(1, "kSuccess"), source="c1") == PublishResult(2, True)
    assert job_to_rest(client.get(1, source="c1").job) == DAILY
    # A job message, and a whole ProtectionRunInstance as the job, both work.
    renamed = ProtectionJob(job_id=7, job_name="vm-daily (renamed)")
    assert client.publish(run(1, "kSuccess"), source="c1", job=renamed) == PublishResult(3, True)
    instance = {**DAILY, "protectionShellInfo": run(2), "backupRun": {}}
    assert client.publish(run(2), source="c1", job=instance) == PublishResult(4, True)
    assert job_to_rest(client.get(2, source="c1").job) == DAILY
    client.publish(run(3), source="c1")
    assert not client.get(3, source="c1").HasField("job")


@pytest.mark.parametrize(
    ("job", "field"),
    [
        ({"jobId": "seven"}, "jobId"),
        ({"jobUid": {"clusterId": 1.5}}, "jobUid.clusterId"),
        ({"jobName": 7}, "jobName"),
        (["jobId", 7], "job"),
    ],
)
def test_a_bad_job_is_a_rest_decode_error_naming_the_key(client: RunUpdateClient, job: Any, field: str) -> None:
    with pytest.raises(RestDecodeError) as info:
        client.publish(run(1), job=job)
    assert info.value.field == field
    with pytest.raises(RestDecodeError) as info:
        list(client.publish_many([("a", run(1), job)]))
    assert info.value.field == field


def test_publish_many_takes_triples_and_list_and_watch_filter_by_job(client: RunUpdateClient) -> None:
    hourly = {"jobId": 8, "jobName": "db-hourly"}
    items: list[Any] = [("a", run(1), DAILY), ("a", run(2), hourly), ("b", run(1), None), ("b", run(2)), run(3)]
    assert [r.revision for r in client.publish_many(items, source="c") if isinstance(r, PublishResult)] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert [(u.source, u.run.job_run_id) for u in client.list(job_ids=7)] == [("a", 1)]
    assert [(u.source, u.run.job_run_id) for u in client.list(job_ids=[7, 8])] == [("a", 1), ("a", 2)]
    assert list(client.list(job_ids=[9])) == []
    with Collector(client.watch(start_revision=1, job_ids=[8])) as watch:
        client.publish(run(2, "kSuccess"), source="a")  # revision 6, keeps job 8
        client.publish(run(1, "kSuccess"), source="a")  # revision 7, job 7: filtered out
        client.publish(run(9), source="z", job={"jobId": 8})  # revision 8
        events = watch.take(3)
    assert revisions(events) == [2, 6, 8]
    assert all(e.update is not None and e.update.job.job_id == 8 for e in events)
    with pytest.raises(RestDecodeError) as info:
        client.list(job_ids=["7"])  # type: ignore[list-item]
    assert info.value.field == "jobId"


def test_an_unreachable_server_is_unavailable() -> None:
    with RunUpdateClient("127.0.0.1:1", timeout=WAIT) as client, pytest.raises(ServiceError) as info:
        client.get(1)
    assert info.value.code == "UNAVAILABLE"


# --- watch ---------------------------------------------------------------------------------------


def test_watch_replays_history_then_goes_live(client: RunUpdateClient) -> None:
    for i in range(1, 6):
        client.publish(run(i), source="a")
    with Collector(client.watch(start_revision=2)) as watch:
        history = watch.take(4)
        assert revisions(history) == [2, 3, 4, 5]
        assert [e.update.run.job_run_id for e in history if e.update] == [2, 3, 4, 5]
        assert not any(e.snapshot_complete for e in history)
        assert watch.watch.resume_revision == 6
        client.publish(run(6), source="a")  # live
        client.publish(run(1, "kSuccess"), source="a")
        assert revisions(watch.take(2)) == [6, 7]
        assert watch.watch.reconnects == 0


def test_watch_filters_by_rest_spellings(client: RunUpdateClient) -> None:
    client.publish(run(1), source="a")
    with Collector(client.watch(start_revision=1, sources="a", statuses=["kSuccess", "kFailure"])) as watch:
        client.publish(run(2), source="a")
        client.publish(run(1, "kSuccess"), source="b")
        client.publish(run(1, "kSuccess"), source="a")  # revision 4
        client.publish(run(2, "kFailure"), source="a")  # revision 5
        events = watch.take(2)
        assert revisions(events) == [4, 5]
        assert [to_rest(e.update.run)["status"] for e in events if e.update] == ["kSuccess", "kFailure"]


def test_watch_with_snapshot_sends_latest_states_then_a_marker(client: RunUpdateClient) -> None:
    client.publish(run(1), source="a")  # 1, superseded by 3
    client.publish(run(2), source="a")  # 2
    client.publish(run(1, "kSuccess"), source="a")  # 3
    client.publish(run(5), source="b")  # 4
    with Collector(client.watch(include_snapshot=True)) as watch:
        events = watch.take(4)
        assert revisions(events) == [2, 3, 4, 4]
        assert [e.snapshot_complete for e in events] == [False, False, False, True]
        assert events[3].update is None
        client.publish(run(2, "kSuccess"), source="a")  # live, after the marker
        (live,) = watch.take(1)
        assert live.revision == 5
        assert live.update is not None
        assert live.update.run.job_run_id == 2


def test_watch_from_now_learns_its_start_from_progress(client: RunUpdateClient) -> None:
    client.publish(run(1))  # before the watch: not delivered
    watch = client.watch(progress_interval_ms=100)
    with Collector(watch) as collector:
        deadline = time.monotonic() + WAIT
        while watch.resume_revision is None:  # until the first progress response
            assert time.monotonic() < deadline, "no progress response"
            time.sleep(0.01)
        assert watch.resume_revision == 2
        client.publish(run(2))
        (event,) = collector.take(1)
        assert event.revision == 2


def test_watch_from_now_cut_early_resumes_where_the_server_says(host: ServerHost) -> None:
    store = MemoryStore()
    server = host.start(store, ServerConfig(max_watch_queue=5))
    with RunUpdateClient(f"127.0.0.1:{server.port}", timeout=WAIT) as client:
        client.publish(run(1))  # before the watch: not delivered
        watch = client.watch()  # from now; no progress for 5 s
        with Collector(watch) as collector:
            # Wait until the server has registered the watcher (server
            # internals, read only): then the burst is "after now".
            deadline = time.monotonic() + WAIT
            while not server.servicer._hub.watchers:
                assert time.monotonic() < deadline, "the watch did not reach the server"
                time.sleep(0.01)
            # The commits overflow the watcher before it sent anything but its
            # start; the RESOURCE_EXHAUSTED status names the last revision it
            # was sent.
            host.publish_commits(store, [("", run(i)) for i in range(2, 12)])
            assert revisions(collector.take(10)) == list(range(2, 12))
            assert watch.last_error is not None
            assert watch.last_error.code == "RESOURCE_EXHAUSTED"


def test_a_snapshot_cut_short_is_completed_from_the_history(host: ServerHost) -> None:
    store = MemoryStore()
    count = 2000
    host.publish_direct(store, [("a", run(i, error="x" * 1000)) for i in range(1, count + 1)])
    first = host.start(store, ServerConfig(max_batch_updates=1))
    port = first.port
    # HTTP/2 flow control with a fixed 64 KiB window keeps most of the 2 MB
    # snapshot on the server while the caller reads slowly, so the server
    # stops in the middle of it.
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)]
    with RunUpdateClient(f"127.0.0.1:{port}", timeout=WAIT, options=window) as client:
        watch = client.watch(include_snapshot=True, progress_interval_ms=100, reconnect=ReconnectPolicy(timeout=WAIT))
        try:
            events = [next(watch) for _ in range(3)]
            host.stop(first)
            host.publish_direct(store, [("b", run(1))])  # revision count + 1, while down
            host.start(store, port=port)
            while not events[-1].snapshot_complete:
                events.append(next(watch))
        finally:
            watch.close()
    marker = events.pop()
    # Each update once, in order; the one published while the server was down
    # comes before the marker: the history completed the snapshot.
    assert revisions(events) == list(range(1, count + 2))
    assert marker.revision >= count + 1
    assert watch.reconnects == 1


def test_watch_raises_history_expired_for_a_trimmed_history(host: ServerHost) -> None:
    store = MemoryStore(retention=Retention(max_updates=10))
    server = host.start(store)
    with RunUpdateClient(f"127.0.0.1:{server.port}", timeout=WAIT) as client:
        assert len(list(client.publish_many(run(i) for i in range(1, 31)))) == 30
        watch = client.watch(start_revision=1)
        with pytest.raises(HistoryExpired) as info:
            next(watch)
        error = info.value
        assert (error.code, error.reason) == ("OUT_OF_RANGE", "HISTORY_EXPIRED")
        assert (error.requested, error.oldest_revision) == (1, 21)
        assert isinstance(error.__cause__, grpc.RpcError)
        assert watch.reconnects == 0
        with Collector(client.watch(start_revision=error.oldest_revision)) as ok:
            assert revisions(ok.take(10)) == list(range(21, 31))


def test_watch_beyond_the_head_raises_revision_in_future(host: ServerHost) -> None:
    store = MemoryStore()
    host.publish_direct(store, [("a", run(i)) for i in range(1, 4)])
    server = host.start(store)
    with RunUpdateClient(f"127.0.0.1:{server.port}", timeout=WAIT) as client:
        watch = client.watch(start_revision=9)
        with pytest.raises(RevisionInFuture) as info:
            next(watch)
    error = info.value
    assert isinstance(error, ServiceError)
    assert (error.code, error.reason, error.requested, error.head_revision) == (
        "OUT_OF_RANGE",
        "REVISION_IN_FUTURE",
        9,
        3,
    )
    assert error.metadata["head_revision"] == "3"
    assert watch.reconnects == 0


def test_a_resume_against_a_reset_store_raises_instead_of_restarting(host: ServerHost) -> None:
    """The server comes back on the same port with an empty store: the watch must not wait at revision 4."""
    store = MemoryStore()
    host.publish_direct(store, [("a", run(i)) for i in range(1, 4)])
    first = host.start(store)
    with RunUpdateClient(f"127.0.0.1:{first.port}", timeout=WAIT) as client:
        watch = client.watch(start_revision=1, reconnect=ReconnectPolicy(timeout=WAIT))
        with Collector(watch) as collector:
            assert revisions(collector.take(3)) == [1, 2, 3]
            host.stop(first)  # the watch ends with UNAVAILABLE and resumes from 4 ...
            host.start(MemoryStore(), port=first.port)  # ... against a store whose head is 0
            with pytest.raises(RevisionInFuture) as info:
                collector.take(1)
    assert (info.value.requested, info.value.head_revision) == (4, 0)
    assert watch.reconnects >= 1


def test_watch_resumes_after_a_server_restart_on_the_same_store(host: ServerHost) -> None:
    store = MemoryStore()
    first = host.start(store)
    port = first.port
    address = f"127.0.0.1:{port}"
    with RunUpdateClient(address, timeout=WAIT) as client:
        for i in range(1, 4):
            client.publish(run(i), source="a")
        watch = client.watch(start_revision=1, progress_interval_ms=100, reconnect=ReconnectPolicy(timeout=WAIT))
        with Collector(watch) as collector:
            assert revisions(collector.take(3)) == [1, 2, 3]

            def restart() -> None:
                host.stop(first)  # the watch ends with UNAVAILABLE
                host.publish_direct(store, [("a", run(i)) for i in range(4, 8)])  # 4..7 while down
                time.sleep(0.3)  # let the watch fail to reconnect a few times
                host.start(store, port=port)
                # A channel of its own: channels of one process share connections
                # by default, and the watch's is still backing off.
                with RunUpdateClient(address, timeout=WAIT, options=[("grpc.use_local_subchannel_pool", 1)]) as other:
                    for i in range(8, 11):
                        other.publish(run(i), source="a")

            with ThreadPoolExecutor(1) as pool:
                restarted = pool.submit(restart)
                events = collector.take(7)
                restarted.result(WAIT)
            assert revisions(events) == list(range(4, 11))  # every update once, in order
            assert [e.update.run.job_run_id for e in events if e.update] == list(range(4, 11))
            assert watch.reconnects >= 1
            assert watch.last_error is not None
            assert watch.last_error.code == "UNAVAILABLE"
            assert watch.resume_revision == 11
            client.publish(run(11), source="a")  # and it is live again
            assert revisions(collector.take(1)) == [11]
        assert collector.items.get(timeout=WAIT) is _END  # close() ended the iteration


def test_watch_resumes_after_resource_exhausted(host: ServerHost) -> None:
    store = MemoryStore()
    server = host.start(store, ServerConfig(max_watch_queue=5))
    with RunUpdateClient(f"127.0.0.1:{server.port}", timeout=WAIT) as client:
        client.publish(run(1), source="a")
        watch = client.watch(start_revision=1)
        with Collector(watch, delay=0.002) as collector:
            assert revisions(collector.take(1)) == [1]
            # 60 commits in one turn of the server's loop: the watcher's queue
            # overflows (more than 5 behind) whatever the consumer does.
            host.publish_commits(store, [("a", run(i)) for i in range(2, 62)])
            assert revisions(collector.take(60)) == list(range(2, 62))
            # And a burst over the publish stream while the consumer is slow.
            results = list(client.publish_many([run(i) for i in range(62, 262)], source="b"))
            assert all(isinstance(r, PublishResult) and r.changed for r in results)
            assert revisions(collector.take(200)) == list(range(62, 262))
            assert watch.reconnects >= 1
            assert watch.last_error is not None
            assert (watch.last_error.code, watch.last_error.reason) == ("RESOURCE_EXHAUSTED", "WATCHER_TOO_SLOW")


def test_watch_gives_up_as_its_policy_says(host: ServerHost) -> None:
    store = MemoryStore()
    server = host.start(store)
    with RunUpdateClient(f"127.0.0.1:{server.port}", timeout=WAIT) as client:
        client.publish(run(1))
        policy = ReconnectPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=3)
        watch = client.watch(start_revision=1, reconnect=policy)
        with Collector(watch) as collector:
            assert revisions(collector.take(1)) == [1]
            host.stop(server)
            error = collector.error()
        assert isinstance(error, ServiceError)
        assert error.code == "UNAVAILABLE"
        assert watch.reconnects == 3
        assert isinstance(error.__cause__, grpc.RpcError)


def test_watch_stops_when_closed(client: RunUpdateClient) -> None:
    client.publish(run(1))
    watch = client.watch(start_revision=1)
    assert next(watch).revision == 1
    watch.close()
    with pytest.raises(StopIteration):
        next(watch)
    watch.close()  # idempotent


# --- the asyncio client ---------------------------------------------------------------------------------


def test_async_client_publishes_gets_lists_and_watches(address: str) -> None:
    async def main() -> None:
        async with AsyncRunUpdateClient(address, timeout=WAIT) as client:
            assert await client.publish(run(1), source="a") == PublishResult(1, True)
            assert await client.publish(run(1), source="a") == PublishResult(1, False)

            async def items() -> Any:
                yield run(2)
                yield {"status": "kRunning"}
                yield ("b", ProtectionShellInfo(job_run_id=3))

            results = [r async for r in client.publish_many(items(), source="a")]
            assert results[0] == PublishResult(2, True)
            assert isinstance(results[1], RunRejected)
            assert results[1].field == "jobRunId"
            assert results[2] == PublishResult(3, True)

            assert (await client.get(3, source="b")).revision == 3
            with pytest.raises(ServiceError) as info:
                await client.get(3)
            assert info.value.code == "NOT_FOUND"
            with pytest.raises(RunRejected) as refused:
                await client.publish(run(4, startTimeUsecs=5, endTimeUsecs=1))
            assert refused.value.field == "endTimeUsecs"

            listed = [(u.source, u.run.job_run_id) async for u in client.list(page_size=1, statuses="kRunning")]
            assert listed == [("a", 1), ("a", 2)]

            async with client.watch(start_revision=2) as watch:
                await client.publish(run(2, "kSuccess"), source="a")
                got = [await anext(watch) for _ in range(3)]
                assert revisions(got) == [2, 3, 4]
                assert watch.resume_revision == 5

            async with client.watch(include_snapshot=True, sources=["a"]) as watch:
                got = [await anext(watch) for _ in range(3)]
                assert revisions(got) == [1, 4, 4]
                assert got[2].snapshot_complete

    asyncio.run(main())


def test_async_watch_resumes_after_a_server_restart(host: ServerHost) -> None:
    store = MemoryStore()
    first = host.start(store)
    port = first.port
    address = f"127.0.0.1:{port}"

    async def main() -> list[int]:
        async with AsyncRunUpdateClient(address, timeout=WAIT) as client:
            await client.publish(run(1))
            watch = client.watch(start_revision=1, reconnect=ReconnectPolicy(timeout=WAIT))
            async with watch:
                seen = [(await asyncio.wait_for(anext(watch), WAIT)).revision]
                await asyncio.to_thread(host.stop, first)
                await asyncio.to_thread(host.publish_direct, store, [("", run(i)) for i in range(2, 5)])
                await asyncio.to_thread(host.start, store, port=port)
                seen += [(await asyncio.wait_for(anext(watch), WAIT)).revision for _ in range(3)]
                assert watch.reconnects >= 1
            return seen

    assert asyncio.run(main()) == [1, 2, 3, 4]


def test_async_watch_close_from_another_task(client: RunUpdateClient, address: str) -> None:
    async def main() -> None:
        async with AsyncRunUpdateClient(address, timeout=WAIT) as aclient:
            watch = aclient.watch(start_revision=1)
            events: list[WatchEvent] = []
            first = asyncio.Event()

            async def consume() -> None:
                async for event in watch:
                    events.append(event)
                    first.set()

            consumer = asyncio.create_task(consume())
            await aclient.publish(run(1))
            await asyncio.wait_for(first.wait(), WAIT)
            watch.close()  # while the consumer waits for the next event
            await asyncio.wait_for(consumer, WAIT)
            assert revisions(events) == [1]

    asyncio.run(main())


# --- authentication and TLS -------------------------------------------------------------------------------


def test_bearer_token(host: ServerHost) -> None:
    server = host.start(MemoryStore(), ServerConfig(tokens=frozenset({"s3cret"})))
    address = f"127.0.0.1:{server.port}"
    with RunUpdateClient(address, token="s3cret", timeout=WAIT) as client:
        assert client.publish(run(1)).revision == 1
        assert client.get(1).revision == 1
        assert [u.revision for u in client.list()] == [1]
        with Collector(client.watch(start_revision=1)) as watch:
            assert revisions(watch.take(1)) == [1]
    for token in ("wrong", None):
        with RunUpdateClient(address, token=token, timeout=WAIT) as client:
            with pytest.raises(ServiceError) as info:
                client.publish(run(2))
            assert info.value.code == "UNAUTHENTICATED"
            assert not isinstance(info.value, RunRejected)
            with pytest.raises(ServiceError) as info:
                list(client.publish_many([run(2)]))
            assert info.value.code == "UNAUTHENTICATED"
            watch = client.watch(start_revision=1)
            with pytest.raises(ServiceError) as info:
                next(watch)
            assert info.value.code == "UNAUTHENTICATED"
            assert watch.reconnects == 0


def test_a_plaintext_token_goes_to_loopback_only() -> None:
    with pytest.raises(ConfigurationError, match="plaintext"):
        RunUpdateClient("shellinfo.example:50051", token="s3cret")
    for address in ("localhost:50051", "[::1]:50051", "dns:///127.0.0.1:50051", "unix:/tmp/shellinfo.sock"):
        RunUpdateClient(address, token="s3cret").close()
    RunUpdateClient("shellinfo.example:50051", token="s3cret", allow_insecure_token=True).close()


def test_mutual_tls_with_a_token(host: ServerHost, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = TlsConfig(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca.cert)
    server = host.start(MemoryStore(), ServerConfig(tls=tls, tokens=frozenset({"s3cret"})))
    address = f"localhost:{server.port}"
    with RunUpdateClient(
        address, token="s3cret", tls_ca=pki.ca.cert, tls_cert=pki.client.cert, tls_key=pki.client.key, timeout=WAIT
    ) as client:
        assert client.publish(run(1)) == PublishResult(1, True)
        with Collector(client.watch(start_revision=1)) as watch:
            assert revisions(watch.take(1)) == [1]
    with (
        RunUpdateClient(
            address, token="wrong", tls_ca=pki.ca.cert, tls_cert=pki.client.cert, tls_key=pki.client.key, timeout=WAIT
        ) as client,
        pytest.raises(ServiceError) as info,
    ):
        client.get(1)
    assert info.value.code == "UNAUTHENTICATED"


def test_tls_files_that_cannot_be_read_are_configuration_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigurationError, match=r"nope\.pem"):
        RunUpdateClient("localhost:1", tls_ca=missing)
    with pytest.raises(ConfigurationError, match="together"):
        RunUpdateClient("localhost:1", tls_cert=missing)


def test_a_snapshot_cut_short_after_its_history_was_trimmed_is_taken_again(host: ServerHost) -> None:
    """A snapshot that breaks off is completed from the history; when the
    history no longer reaches back that far, the watch takes a new snapshot
    instead of failing, and delivers nothing twice."""
    store = MemoryStore(retention=Retention(max_updates=50))
    big = "x" * 20_000
    host.publish_direct(store, [("", run(i, error=big)) for i in range(1, 301)])
    server = host.start(store, ServerConfig(max_batch_updates=1, max_watch_queue=1))
    with RunUpdateClient(f"127.0.0.1:{server.port}", timeout=WAIT) as client:
        watch = client.watch(include_snapshot=True, reconnect=ReconnectPolicy(initial_delay=0.01, timeout=WAIT))
        with Collector(watch) as collector:
            (first,) = collector.take(1)
            # Two commits while the watcher holds a queue bound of 1: it
            # overflows mid-snapshot and must resume; runs 1..250 are older
            # than the retained history.
            host.publish_commits(store, [("", run(1001)), ("", run(1002))])
            events = collector.take(302)  # 301 updates and the snapshot-complete event
            updates = [first, *(e for e in events if e.update is not None)]
            assert [e.update.run.job_run_id for e in updates if e.update] == [*range(1, 301), 1001, 1002]
            assert len({e.revision for e in updates}) == len(updates)  # nothing twice
            assert any(e.snapshot_complete for e in events)
            assert isinstance(watch.last_error, HistoryExpired)  # the history could not complete it
