"""NatsStore on real nats-server processes: several replicas, one ordered history, nothing lost.

The contract every store keeps is tested in test_store.py (NatsStore
included); this module tests what only a shared JetStream stream does:

* the ``nats://`` store URL and what it creates (stream, subjects, replicas,
  retention, the bucket of latest states without limits), revision = stream
  sequence, the bucket entry = the last message of the run's subject;
* catch-up from a replica's in-memory window and from JetStream alike;
  ListRuns reading one page; a stream without a bucket copied into one;
* a replica SIGKILLed between its two writes (history, bucket), repaired by
  the next publish of the run and by a start;
* the rules across replicas: idempotent republish, final statuses, and no
  update lost when publishers on two replicas race on the same runs;
* two service processes on one stream: publish on one, watch on the other;
* a service replica killed with SIGKILL under a watcher whose target lists
  both replicas: the watch fails over with no gap and no duplicate;
* a three-node JetStream cluster with an R3 stream losing its stream leader
  mid-burst: every acknowledged update is kept, in order;
* NATS down under a running service: UNAVAILABLE, then recovery without a
  restart, and an open watch that goes on.

Everything listens on 127.0.0.1; every wait is bounded; every process is
killed at the end whatever happens. Without the nats-server binary the tests
that need one are skipped (under CI that is a failure).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import nats
import pytest
from nats.js import api
from nats_fixtures import (
    NatsNode,
    ServiceReplica,
    cluster_of_three,
    free_ports,
    single_server,
)

from shellinfo_grpc import from_rest
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as svc
from shellinfo_grpc.client import ReconnectPolicy, RunUpdateClient, RunWatch, WatchEvent
from shellinfo_grpc.errors import ConfigurationError, HistoryExpired, RunRejected, ServiceError, StoreUnavailable
from shellinfo_grpc.stores import PublishOutcome, Retention, Store
from shellinfo_grpc.stores._registry import open_store
from shellinfo_grpc.stores.nats import PAUSE_HOOK_ENV, NatsStore

WAIT = 20.0  # the longest any single wait may take, in seconds

pytestmark = pytest.mark.timeout(120)  # a hang fails the test instead of the run

T = TypeVar("T")

S = pb.RunStatus


# --- helpers ------------------------------------------------------------------------------


def shell(job_run_id: int, status: int = S.RUN_STATUS_RUNNING, **fields: Any) -> pb.ProtectionShellInfo:
    return pb.ProtectionShellInfo(job_run_id=job_run_id, status=status, **fields)  # type: ignore[arg-type]


def names() -> tuple[str, str]:
    """A fresh stream name and subject prefix, so that tests on one server never meet."""
    tag = uuid.uuid4().hex[:12]
    return f"T{tag.upper()}", f"test.{tag}.runs"


def replica_pair(node: NatsNode, replicas: Callable[..., ServiceReplica]) -> tuple[ServiceReplica, ServiceReplica]:
    """Two service replicas, "a" and "b", on a fresh stream of ``node``."""
    stream, prefix = names()
    url = f"{node.url}?stream={stream}&subject_prefix={prefix}"
    return replicas(url, "a"), replicas(url, "b")


async def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


async def retry_unavailable(read: Callable[[], Awaitable[T]], timeout: float = WAIT) -> T:
    """``await read()``, again after each StoreUnavailable, for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await read()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@dataclass(frozen=True)
class StreamMessage:
    """One message of the stream as JetStream keeps it."""

    seq: int
    subject: str
    expected_last_subject_seq: int | None
    update: svc.RunUpdate


@contextlib.asynccontextmanager
async def jetstream(servers: Sequence[str]) -> Any:
    """A JetStream manager on a connection of its own (not the store's)."""
    nc = await nats.connect(list(servers), connect_timeout=2, max_reconnect_attempts=5, reconnect_time_wait=0.2)
    try:
        yield nc.jsm(timeout=10)
    finally:
        await nc.close()


async def stream_messages(servers: Sequence[str], stream: str) -> list[StreamMessage]:
    """Every message of the stream, in sequence order, read straight from JetStream."""
    async with jetstream(servers) as jsm:
        state = (await jsm.stream_info(stream)).state
        messages = []
        for seq in range(state.first_seq, state.last_seq + 1):
            raw = await jsm.get_msg(stream, seq)
            expected = (raw.headers or {}).get("Nats-Expected-Last-Subject-Sequence")
            update = svc.RunUpdate.FromString(raw.data or b"")
            update.revision = raw.seq
            messages.append(StreamMessage(raw.seq, raw.subject, None if expected is None else int(expected), update))
        return messages


def assert_chained(messages: Sequence[StreamMessage]) -> None:
    """Each write of a run was made on the run's previous message (optimistic concurrency held)."""
    last: dict[str, int] = {}
    for message in messages:
        assert message.expected_last_subject_seq == last.get(message.subject, 0), message
        last[message.subject] = message.seq


def count_conflicts(*stores: Store) -> list[str]:
    """Spy on started NatsStores: the subjects of the publishes JetStream refused as stale (error 10071).

    A refused write means two replicas raced on a run and the loser decided
    again on the winner's state; a test of that race checks it happened.
    """
    refused: list[str] = []
    for store in stores:
        assert isinstance(store, NatsStore)
        js = store._js
        publish = js.publish

        async def spy(subject: str, *args: Any, _publish: Any = publish, **kwargs: Any) -> Any:
            try:
                return await _publish(subject, *args, **kwargs)
            except nats.js.errors.APIError as exc:
                if exc.err_code == 10071:
                    refused.append(subject)
                raise

        js.publish = spy
    return refused


@contextlib.asynccontextmanager
async def started(*stores: Store) -> Any:
    for store in stores:
        await store.start()
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


class Heard:
    """A listener that keeps the revisions it hears."""

    def __init__(self, store: Store) -> None:
        self.revisions: list[int] = []
        store.add_listener(lambda updates: self.revisions.extend(u.revision for u in updates))


class WatchThread:
    """Iterates a blocking watch on a thread, keeping every event (bounded waits only)."""

    def __init__(self, watch: RunWatch) -> None:
        self.watch = watch
        self.events: list[WatchEvent] = []
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._consume, name="watch", daemon=True)
        self.thread.start()

    def _consume(self) -> None:
        try:
            for event in self.watch:
                with self._lock:
                    self.events.append(event)
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def all_events(self) -> list[WatchEvent]:
        with self._lock:
            return list(self.events)

    def revisions(self) -> list[int]:
        with self._lock:
            return [event.revision for event in self.events if event.update is not None]

    def updates(self) -> list[svc.RunUpdate]:
        with self._lock:
            return [event.update for event in self.events if event.update is not None]

    def wait_for_revision(self, revision: int, timeout: float = WAIT) -> None:
        def reached() -> bool:
            if self.error is not None:
                raise self.error
            seen = self.revisions()
            return bool(seen) and seen[-1] >= revision

        wait_until(reached, f"the watch to deliver revision {revision}", timeout)

    def wait_started(self) -> None:
        """Wait until a watch from now knows where it starts (its first response arrived)."""
        wait_until(lambda: self.watch.resume_revision is not None, "the watch's first response")

    def close(self) -> None:
        self.watch.close()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


def assert_gapless_once(revisions: Sequence[int], first: int = 1) -> None:
    """Revisions ``first``, ``first + 1``, ...: each once, in order, none missing."""
    assert list(revisions) == list(range(first, first + len(revisions))), revisions


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsNode]:
    """One JetStream server shared by the tests that leave it running (each on its own stream)."""
    with single_server(tmp_path_factory.mktemp("nats")) as node:
        yield node


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsNode]:
    """A JetStream server of this test's alone, which it may stop and start."""
    with single_server(tmp_path / "nats") as node:
        yield node


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Callable[..., ServiceReplica]]:
    """Starts service processes; every one is killed at the end of the test."""
    started_replicas: list[ServiceReplica] = []

    def start(store_url: str, name: str) -> ServiceReplica:
        replica = ServiceReplica(store_url, tmp_path / "replicas", name)
        started_replicas.append(replica)
        return replica.start()

    yield start
    for replica in started_replicas:
        replica.kill()


# --- the store URL --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("nats://127.0.0.1:4222?bogus=1", "unknown option", id="unknown-option"),
        pytest.param("nats://127.0.0.1:4222?stream=a.b", "stream name", id="dotted-stream"),
        pytest.param("nats://127.0.0.1:4222?subject_prefix=a.>", "subject prefix", id="wildcard-prefix"),
        pytest.param("nats://127.0.0.1:4222?subject_prefix=a.", "subject prefix", id="prefix-ends-in-dot"),
        pytest.param("nats://127.0.0.1:4222?replicas=0", "positive", id="zero-replicas"),
        pytest.param("nats://127.0.0.1:4222?replicas=three", "store URL", id="replicas-not-a-number"),
        pytest.param("nats://127.0.0.1:4222?timeout=0", "positive", id="zero-timeout"),
        pytest.param("nats://?stream=S", "host", id="no-host"),
        pytest.param("nats://127.0.0.1:4222?creds=/nonexistent/x.creds", "not found", id="missing-creds"),
        pytest.param("nats://127.0.0.1:4222?tls_cert=/x.pem", "tls_key", id="cert-without-key"),
    ],
)
def test_bad_store_urls_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        open_store(url)


def test_store_url_lists_every_server_and_keeps_credentials() -> None:
    store = open_store("nats://u:p@127.0.0.1:1,127.0.0.1:2?stream=S&subject_prefix=a.b&replicas=3&max_attempts=4")
    assert isinstance(store, NatsStore)
    assert store._servers == ["nats://u:p@127.0.0.1:1", "nats://u:p@127.0.0.1:2"]
    assert (store._stream, store._prefix, store._replicas, store._max_attempts) == ("S", "a.b", 3, 4)


def test_unreachable_nats_fails_start_with_a_configuration_error(caplog: pytest.LogCaptureFixture) -> None:
    """One error that counts the failed attempts; not one warning per attempt (every 0.5 s)."""
    (port,) = free_ports(1)
    store = open_store(f"nats://127.0.0.1:{port}?timeout=1")

    async def main() -> None:
        with pytest.raises(ConfigurationError, match=r"cannot connect.*\((\d+) failed attempts\)") as caught:
            await asyncio.wait_for(store.start(), 3)
        assert "\n" not in str(caught.value)

    with caplog.at_level("DEBUG", logger="shellinfo_grpc.nats_store"):
        asyncio.run(main())
    assert [r for r in caplog.records if r.name == "shellinfo_grpc.nats_store"] == []


def test_replicas_beyond_a_single_server_fail_start(nats_server: NatsNode) -> None:
    stream, prefix = names()
    store = open_store(f"{nats_server.url}?stream={stream}&subject_prefix={prefix}&replicas=3")

    async def main() -> None:
        with pytest.raises(ConfigurationError, match=stream):
            await store.start()
        await store.close()

    asyncio.run(main())


def test_store_url_makes_the_stream_revision_is_its_sequence(nats_server: NatsNode) -> None:
    """open_store(nats://...) with stream, subject prefix, replicas and retention."""
    stream, prefix = names()
    url = f"nats://{nats_server.address}?stream={stream}&subject_prefix={prefix}&replicas=1"
    retention = Retention(max_updates=500, max_age_seconds=3600)

    async def main() -> None:
        store = open_store(url, retention=retention)
        assert isinstance(store, NatsStore)
        async with started(store):
            first = await store.publish("agent-1", shell(1))
            other = await store.publish("agent-2", shell(1))  # another source: another run
            final = await store.publish("agent-1", shell(1, S.RUN_STATUS_SUCCESS, end_time_usecs=9))
            again = await store.publish("agent-1", shell(1, S.RUN_STATUS_SUCCESS, end_time_usecs=9))
            odd = await store.publish("é .*>", shell(-7))  # a source no subject token could hold as is
            assert [o.update.revision for o in (first, other, final, again, odd)] == [1, 2, 3, 3, 4]
            assert (final.changed, again.changed) == (True, False)

            async with jetstream([nats_server.url]) as jsm:
                info = await jsm.stream_info(stream, subjects_filter=">")
                latest_by_subject = {}
                for subject in info.state.subjects:
                    raw = await jsm.get_last_msg(stream, subject)
                    latest_by_subject[subject] = (raw.seq, svc.RunUpdate.FromString(raw.data))
            config, state = info.config, info.state
            assert config.subjects == [f"{prefix}.>"]
            assert (config.num_replicas, config.max_msgs, config.max_age) == (1, 500, 3600)
            assert config.storage == api.StorageType.FILE
            assert (state.messages, state.first_seq, state.last_seq, len(state.subjects)) == (4, 1, 4, 3)

            # Revision = stream sequence; the stored message is the update.
            messages = await stream_messages([nats_server.url], stream)
            history = await store.history(1, 100, 100)
            assert [m.update for m in messages] == history
            assert [m.seq for m in messages] == [u.revision for u in history] == [1, 2, 3, 4]
            for message in messages:
                assert message.subject.startswith(f"{prefix}.")
                assert message.subject.endswith(f".{message.update.run.job_run_id}")
            assert_chained(messages)

            # The bucket of latest states: one entry per run, no limits whatever the retention.
            async with jetstream([nats_server.url]) as jsm:
                bucket = await jsm.stream_info(f"KV_{stream}_LATEST")
            assert (bucket.config.max_msgs_per_subject, bucket.config.num_replicas) == (1, 1)
            assert bucket.config.max_msgs in (None, -1)
            assert not bucket.config.max_age
            assert bucket.state.messages == 3
            # Latest state = the last message of the run's subject.
            assert len(latest_by_subject) == 3
            for seq, update in latest_by_subject.values():
                update.revision = seq
                assert await store.get(update.source, update.run.job_run_id) == update
            assert (await store.get("agent-1", 1)) == final.update
            assert await store.get("agent-1", 2) is None
            runs = await store.list_runs(None, None, 10)
            assert sorted(u.revision for u in runs) == sorted(seq for seq, _ in latest_by_subject.values())
            assert await store.get("é .*>", -7) == odd.update

        # A replica that starts later starts at the stream's head, with the same history.
        later = open_store(url, retention=Retention(max_updates=7))  # the stream exists: its limits stay
        async with started(later):
            assert later.head_revision() == 4
            assert await later.history(1, 4, 10) == history
            async with jetstream([nats_server.url]) as jsm:
                assert (await jsm.stream_info(stream)).config.max_msgs == 500

    asyncio.run(main())


def test_retention_limits_the_stream_and_older_watches_expire(nats_server: NatsNode) -> None:
    """Retention becomes the stream's max_msgs; a read before the oldest kept revision is HistoryExpired."""
    stream, prefix = names()

    async def main() -> None:
        store = open_store(f"{nats_server.url}?stream={stream}&subject_prefix={prefix}", retention=Retention(5))
        async with started(store):
            for index in range(8):
                await store.publish("a", shell(index))
            with pytest.raises(HistoryExpired) as caught:
                await store.history(3, 100, 100)
            assert (caught.value.requested, caught.value.oldest_revision) == (3, 4)
            assert [u.revision for u in await store.history(4, 100, 100)] == [4, 5, 6, 7, 8]
            async with jetstream([nats_server.url]) as jsm:
                state = (await jsm.stream_info(stream)).state
            assert (state.first_seq, state.last_seq, state.messages) == (4, 8, 5)

    asyncio.run(main())


def test_a_publish_returns_once_its_replica_has_followed_it(nats_server: NatsNode) -> None:
    stream, prefix = names()

    async def main() -> None:
        store = open_store(f"{nats_server.url}?stream={stream}&subject_prefix={prefix}")
        heard = Heard(store)
        async with started(store):
            for index in range(300):  # each lags with some probability: over 300, almost surely one does
                outcome = await store.publish("a", shell(index))
                assert store.head_revision() >= outcome.update.revision
                assert heard.revisions[-1:] == [outcome.update.revision]

    asyncio.run(main())


def test_a_foreign_message_on_a_run_subject_does_not_block_the_run(nats_server: NatsNode) -> None:
    stream, prefix = names()

    async def main() -> None:
        store = open_store(f"{nats_server.url}?stream={stream}&subject_prefix={prefix}")
        async with started(store):
            first = await store.publish("a", shell(1))
            (message,) = await stream_messages([nats_server.url], stream)
            nc = await nats.connect([nats_server.url])
            try:
                await nc.jetstream().publish(message.subject, b"\xff\xff\xff", stream=stream)  # not a RunUpdate
            finally:
                await nc.close()
            # The latest state lives in the bucket: the foreign message does not replace it.
            assert await store.get("a", 1) == first.update
            outcome = await store.publish("a", shell(1, S.RUN_STATUS_SUCCESS))
            assert outcome.update.revision == first.update.revision + 2

    asyncio.run(main())


def test_a_batch_keeps_each_runs_order_and_answers_in_request_order(nats_server: NatsNode) -> None:
    """NatsStore publishes the runs of a batch concurrently (documented on Store.publish_batch):
    revisions follow request order within each run, and outcomes come back in request order."""
    stream, prefix = names()

    async def main() -> None:
        store = open_store(f"{nats_server.url}?stream={stream}&subject_prefix={prefix}")
        async with started(store):
            items = [("a", shell(run, error=f"{run}-{step}")) for run in range(3) for step in range(3)]
            outcomes = await store.publish_batch(items)
            assert all(isinstance(o, PublishOutcome) for o in outcomes)
            done = [o for o in outcomes if isinstance(o, PublishOutcome)]
            assert [o.update.run.error for o in done] == [run.error for _, run in items]
            assert sorted(o.update.revision for o in done) == list(range(1, 10))
            for run in range(3):
                per_run = [o.update.revision for o in done if o.update.run.job_run_id == run]
                assert per_run == sorted(per_run)

    asyncio.run(main())


def test_catch_up_reads_the_same_from_the_window_and_from_jetstream(nats_server: NatsNode) -> None:
    """history_wire from a replica's in-memory window, from a replica started later (JetStream
    batches only), and from one whose window keeps only the newest few updates: the same updates."""
    stream, prefix = names()
    url = f"{nats_server.url}?stream={stream}&subject_prefix={prefix}"

    async def main() -> None:
        full, small = open_store(url), open_store(f"{url}&window_mib=0.002")  # ~2 KiB: a handful of updates
        async with started(full, small):
            items = [("src", shell(index % 40, error=f"note {index}" * (index % 3))) for index in range(1500)]
            for start in range(0, len(items), 100):
                await full.publish_batch(items[start : start + 100])
            head = full.head_revision()
            assert head == len(items)
            await until(lambda: small.head_revision() == head, "the second replica's feed")
            later = open_store(f"{url}&window_mib=0")  # no window: everything is read from JetStream
            async with started(later):
                readers = (full, small, later)
                for start, end, limit in ((1, head, 10_000), (1, head, 7), (1400, head, 10_000), (head, head, 5)):
                    chunks = [await store.history_wire(start, end, limit) for store in readers]
                    decoded = [[(r, svc.RunUpdate.FromString(data)) for r, data in chunk] for chunk in chunks]
                    assert decoded[0] == decoded[1] == decoded[2], (start, end, limit)
                    expected = list(range(start, min(end, start + limit - 1) + 1))
                    assert [r for r, _ in chunks[0]] == expected
                    assert all(u.revision == r for r, u in decoded[0])
                    assert [u for _, u in decoded[0]] == await later.history(start, end, limit)
                # Pages across the edge of the small window, as a watch reads them.
                position, pages = 1, list[int]()
                while position <= head:
                    page = await small.history_wire(position, head, 333)
                    pages.extend(r for r, _ in page)
                    position = page[-1][0] + 1
                assert pages == list(range(1, head + 1))

    asyncio.run(main())


def test_a_fresh_replica_warms_its_window_while_updates_arrive(nats_server: NatsNode) -> None:
    """A replica started on a filled stream fills its window with the newest history in the background,
    while publishes go on (its live feed appends them): once warm, a catch-up is served from memory,
    the same bytes as a replica without a window reads from JetStream, none lost, repeated or out of
    order. A small window holds only the newest part; window_mib=0 does no warm-up."""
    stream, prefix = names()
    url = f"{nats_server.url}?stream={stream}&subject_prefix={prefix}"

    async def main() -> None:
        writer, cold = open_store(url), open_store(f"{url}&window_mib=0")
        async with started(writer, cold):
            assert isinstance(cold, NatsStore)
            assert cold._warming is None  # window_mib=0: no warm-up
            items = [("src", shell(index % 60, error=f"e{index}" * (index % 4))) for index in range(2000)]
            for start in range(0, len(items), 200):
                await writer.publish_batch(items[start : start + 200])
            filled = writer.head_revision()
            warm, small = open_store(url), open_store(f"{url}&window_mib=0.02")  # ~20 KiB: a few hundred
            assert isinstance(warm, NatsStore)
            assert isinstance(small, NatsStore)
            stretches: list[tuple[int, int]] = []
            live: list[int] = []  # where warm's live feed was when a stretch had been read
            for store in (warm, small):
                read_all = store._read_all

                async def slow(start: int, end: int, read_all: Any = read_all) -> list[tuple[int, bytes]]:
                    stretches.append((start, end))
                    await asyncio.sleep(0.3)  # publishes arrive through the live feed meanwhile
                    entries = cast(list[tuple[int, bytes]], await read_all(start, end))
                    live.append(warm.head_revision())
                    return entries

                store._read_all = slow  # type: ignore[method-assign]
            publishing = True

            async def publish() -> None:
                index = 0
                while publishing or index < 50:
                    await writer.publish("src", shell(1000 + index % 7, error=f"live {index}"))
                    index += 1

            publisher = asyncio.create_task(publish())
            async with started(warm, small):
                began = warm._window.low - 1  # where the live feed began: the warm-up ends there
                assert began >= filled
                await until(lambda: warm._window.low == 1, "the warm-up of the window")
                publishing = False
                await publisher
                head = writer.head_revision()
                await until(lambda: warm.head_revision() == small.head_revision() == head, "the feeds")
                assert stretches[0][1] == began
                assert max(live) > began, "no update arrived during the warm-up"
                reference = await cold.history_wire(1, head, 100_000)
                assert [r for r, _ in reference] == list(range(1, head + 1))

                async def no_jetstream(position: int, count: int) -> Any:
                    raise AssertionError("read from JetStream, not from the window")

                warm._fetches = lambda end: [no_jetstream]  # type: ignore[method-assign]
                assert await warm.history_wire(1, head, 100_000) == reference
                position, paged = 1, list[tuple[int, bytes]]()
                while position <= head:
                    page = await warm.history_wire(position, head, 333)
                    paged += page
                    position = page[-1][0] + 1
                assert paged == reference
                # The small window: only the newest part, at most its size, exact from its low on.
                window = small._window
                assert 1 < window.low <= began
                assert 0 <= window.room < 200
                kept = window.read(window.low, head, 100_000)
                assert kept == reference[window.low - 1 :]
                assert await small.history_wire(1, head, 100_000) == reference  # below it: JetStream

    asyncio.run(main())


def test_a_failed_warm_up_leaves_the_window_as_it_is(nats_server: NatsNode, caplog: pytest.LogCaptureFixture) -> None:
    stream, prefix = names()
    url = f"{nats_server.url}?stream={stream}&subject_prefix={prefix}"

    async def main() -> None:
        writer = open_store(url)
        async with started(writer):
            await writer.publish_batch([("src", shell(index)) for index in range(30)])
            store = open_store(url)
            assert isinstance(store, NatsStore)

            async def broken(start: int, end: int) -> list[tuple[int, bytes]]:
                raise StoreUnavailable("NATS store: no")

            store._read_all = broken  # type: ignore[method-assign]
            async with started(store):
                warming = store._warming
                assert warming is not None
                await warming
                assert store._window.low == 31
                await writer.publish("src", shell(99))
                await until(lambda: store.head_revision() == 31, "the live feed")
                assert [r for r, _ in await store.history_wire(1, 31, 100)] == list(range(1, 32))
        assert sum("the window was not warmed below revision 31" in r.message for r in caplog.records) == 1

    asyncio.run(main())


def test_list_runs_reads_one_page_of_entries_not_every_run(nats_server: NatsNode) -> None:
    """ListRuns pages through the replica's sorted key index and reads only the page's bucket entries,
    also for runs another replica created a moment before (the index first catches up with the bucket)."""
    stream, prefix = names()
    url = f"{nats_server.url}?stream={stream}&subject_prefix={prefix}"

    async def main() -> None:
        writer, reader = open_store(url), open_store(url)
        async with started(writer, reader):
            await writer.publish_batch([(f"src-{run % 3}", shell(run)) for run in range(300)])
            assert isinstance(reader, NatsStore)
            reads: list[str] = []
            entry = reader._latest_entry

            async def counted(subject: str) -> Any:
                reads.append(subject)
                return await entry(subject)

            reader._latest_entry = counted  # type: ignore[method-assign]
            expected = sorted((f"src-{run % 3}", run) for run in range(300))
            seen: list[tuple[str, int]] = []
            after: tuple[str, int] | None = None
            while True:
                reads.clear()
                page = await reader.list_runs(None, after, 25)
                if not page:
                    break
                assert len(reads) == len(page) <= 25  # the page's entries, nothing else
                seen.extend((u.source, u.run.job_run_id) for u in page)
                after = seen[-1]
            assert seen == expected
            reads.clear()
            assert [u.run.job_run_id for u in await reader.list_runs(None, ("src-1", 100), 3)] == [103, 106, 109]
            assert len(reads) == 3

    asyncio.run(main())


def test_a_stream_without_bucket_gets_every_run_copied_on_start(
    nats_server: NatsNode, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream written by a version without the bucket (history only): the first start creates the
    bucket and copies each run's last message into it, so GetRun and ListRuns know every run."""
    stream, prefix = names()
    updates = [
        svc.RunUpdate(source=f"s{run % 2}", run=shell(run, error=f"v{step}")) for step in range(2) for run in range(150)
    ]

    async def main() -> None:
        async with jetstream([nats_server.url]) as jsm:
            await jsm.add_stream(api.StreamConfig(name=stream, subjects=[f"{prefix}.>"], allow_direct=True))
        nc = await nats.connect([nats_server.url])
        try:
            js = nc.jetstream()
            for update in updates:
                token = "s" + base64.urlsafe_b64encode(update.source.encode()).decode().rstrip("=")
                await js.publish(f"{prefix}.{token}.{update.run.job_run_id}", update.SerializeToString(), stream=stream)
        finally:
            await nc.close()
        store = open_store(f"{nats_server.url}?stream={stream}&subject_prefix={prefix}")
        with caplog.at_level("WARNING", logger="shellinfo_grpc.nats_store"):
            async with started(store):
                assert "copied 150 run(s)" in caplog.text
                runs = await store.list_runs(None, None, 1000)
                assert [(u.source, u.run.job_run_id, u.run.error, u.revision) for u in runs] == sorted(
                    (f"s{run % 2}", run, "v1", 151 + run) for run in range(150)
                )
                assert (await store.get("s1", 7)).revision == 158  # type: ignore[union-attr]
                await store.publish("s1", shell(7, S.RUN_STATUS_SUCCESS, end_time_usecs=1))  # on the copied state
                with pytest.raises(RunRejected):
                    await store.publish("s1", shell(7, S.RUN_STATUS_RUNNING))
        async with jetstream([nats_server.url]) as jsm:
            assert (await jsm.stream_info(f"KV_{stream}_LATEST")).state.messages == 150

    asyncio.run(main())


# --- rules across replicas ----------------------------------------------------------------


def test_rules_hold_across_replicas(nats_server: NatsNode) -> None:
    """Idempotent republish and final statuses hold whichever replica wrote the run before."""
    stream, prefix = names()
    url = f"{nats_server.url}?stream={stream}&subject_prefix={prefix}"

    async def main() -> None:
        a, b = open_store(url), open_store(url)
        async with started(a, b):
            run = shell(5, start_time_usecs=100, error="")
            first = await a.publish("src", run)
            same = await b.publish("src", pb.ProtectionShellInfo.FromString(run.SerializeToString()))
            assert (first.changed, same.changed) == (True, False)
            assert same.update == first.update
            assert same.update.revision == 1

            done = await b.publish("src", shell(5, S.RUN_STATUS_SUCCESS, end_time_usecs=200))
            for store in (a, b):
                with pytest.raises(RunRejected) as caught:
                    await store.publish("src", shell(5, S.RUN_STATUS_RUNNING))
                assert (caught.value.code, caught.value.reason, caught.value.field) == (
                    "FAILED_PRECONDITION",
                    "RUN_FINAL",
                    "status",
                )
                with pytest.raises(RunRejected, match="final"):
                    await store.publish("src", shell(5, S.RUN_STATUS_FAILURE, end_time_usecs=200))
            replay = await a.publish("src", shell(5, S.RUN_STATUS_SUCCESS, end_time_usecs=200))
            assert (replay.changed, replay.update) == (False, done.update)
            note = await a.publish("src", shell(5, S.RUN_STATUS_SUCCESS, end_time_usecs=200, error="late note"))
            assert (note.changed, note.update.revision) == (True, 3)
            assert await b.get("src", 5) == note.update
            messages = await stream_messages([nats_server.url], stream)
            assert [m.seq for m in messages] == [1, 2, 3]
            assert_chained(messages)

    asyncio.run(main())


def test_concurrent_publishers_on_two_replicas_lose_nothing(nats_server: NatsNode) -> None:
    """20 publishers on two replicas race on 3 runs; every acknowledged update is kept once."""
    stream, prefix = names()
    url = f"{nats_server.url}?stream={stream}&subject_prefix={prefix}"
    publishers, each, runs = 20, 15, 3

    async def main() -> None:
        a, b = open_store(url), open_store(url)
        heard_a, heard_b = Heard(a), Heard(b)
        async with started(a, b):
            conflicts = count_conflicts(a, b)

            async def publisher(number: int) -> list[PublishOutcome]:
                store = (a, b)[number % 2]
                outcomes = []
                for index in range(each):
                    note = f"p{number}-{index}"  # every state differs: every publish is a change
                    outcomes.append(await store.publish("shared", shell(index % runs, error=note)))
                return outcomes

            results = await asyncio.gather(*(publisher(n) for n in range(publishers)))
            acked = {o.update.run.error: o.update for outcomes in results for o in outcomes}
            assert all(o.changed for outcomes in results for o in outcomes)
            assert len(acked) == publishers * each
            for outcomes in results:  # each publisher's writes landed in its order
                revisions = [o.update.revision for o in outcomes]
                assert revisions == sorted(revisions)

            messages = await stream_messages([nats_server.url], stream)
            # Every acknowledged update is in the stream exactly once, at its revision, and nothing else is.
            assert [m.seq for m in messages] == list(range(1, publishers * each + 1))
            assert {m.update.run.error: m.update for m in messages} == acked
            assert len({m.update.run.error for m in messages}) == len(messages)
            # Each write was made on the run's previous message: no update overwrote another unseen.
            assert_chained(messages)
            assert len({m.subject for m in messages}) == runs
            assert conflicts, "the replicas never raced on a run: the test proved nothing"

            # Both replicas told their listeners about every update, once, in order.
            total = len(messages)
            await until(lambda: len(heard_a.revisions) >= total and len(heard_b.revisions) >= total, "listeners")
            assert heard_a.revisions == heard_b.revisions == list(range(1, total + 1))

            # Final statuses: the replicas race to end each run differently; one wins, once.
            finals = await asyncio.gather(
                *(
                    store.publish_batch([("shared", shell(run, status, end_time_usecs=1))])
                    for run in range(runs)
                    for store, status in ((a, S.RUN_STATUS_SUCCESS), (b, S.RUN_STATUS_FAILURE))
                )
            )
            for run in range(runs):
                pair = [outcome for (outcome,) in finals[2 * run : 2 * run + 2]]
                won = [o for o in pair if isinstance(o, PublishOutcome)]
                lost = [o for o in pair if isinstance(o, RunRejected)]
                assert len(won) == len(lost) == 1, pair
                assert lost[0].reason == "RUN_FINAL"
                for store in (a, b):
                    assert await store.get("shared", run) == won[0].update
                    with pytest.raises(RunRejected, match="final"):
                        await store.publish("shared", shell(run, S.RUN_STATUS_RUNNING, error="after the end"))
            assert_chained(await stream_messages([nats_server.url], stream))

    asyncio.run(main())


# --- service processes ----------------------------------------------------------------------


def test_two_replica_processes_serve_one_history(
    nats_server: NatsNode, replicas: Callable[..., ServiceReplica]
) -> None:
    """Publish on one replica, watch on the other, live and from revision 1."""
    a, b = replica_pair(nats_server, replicas)
    with RunUpdateClient(a.address, timeout=WAIT) as ca, RunUpdateClient(b.address, timeout=WAIT) as cb:
        live_b, live_a = WatchThread(cb.watch()), WatchThread(ca.watch())
        try:
            live_b.wait_started()
            live_a.wait_started()
            acked: dict[int, tuple[str, int, str]] = {}
            for index in range(10):
                client, source = ((ca, "via-a"), (cb, "via-b"))[index % 2]
                result = client.publish(
                    from_rest({"jobRunId": index % 4, "status": "kRunning", "error": f"n{index}"}), source=source
                )
                assert result.changed
                acked[result.revision] = (source, index % 4, f"n{index}")
            assert sorted(acked) == list(range(1, 11))
            # An identical republish through the other replica is a no-op with the same revision.
            again = cb.publish(from_rest({"jobRunId": 1, "status": "kRunning", "error": "n9"}), source="via-b")
            assert (again.revision, again.changed) == (10, False)
            # A watch from revision 1 on either replica, opened after the fact.
            from_start = [WatchThread(c.watch(start_revision=1)) for c in (ca, cb)]
            try:
                for watch in (live_a, live_b, *from_start):
                    watch.wait_for_revision(10)
                    assert watch.revisions() == list(range(1, 11))
                    assert {u.revision: (u.source, u.run.job_run_id, u.run.error) for u in watch.updates()} == acked
            finally:
                for watch in from_start:
                    watch.close()
            assert ca.get(3, source="via-b") == cb.get(3, source="via-b")
            assert list(ca.list()) == list(cb.list())
        finally:
            live_a.close()
            live_b.close()


def test_snapshot_watch_on_one_replica_while_another_publishes(
    nats_server: NatsNode, replicas: Callable[..., ServiceReplica]
) -> None:
    """A snapshot watch on B, opened while a stream of updates goes in through A, misses and repeats nothing."""
    a, b = replica_pair(nats_server, replicas)
    count = 400
    with RunUpdateClient(a.address, timeout=WAIT) as ca, RunUpdateClient(b.address, timeout=WAIT) as cb:

        def items() -> Iterator[tuple[str, dict[str, Any]]]:
            for index in range(count):
                time.sleep(0.004)  # a steady stream, so that the snapshot is taken in the middle of it
                yield ("src", {"jobRunId": index % 7, "status": "kRunning", "error": f"n{index}"})

        results: list[Any] = []
        feeder = threading.Thread(target=lambda: results.extend(ca.publish_many(items())), daemon=True)
        feeder.start()
        wait_until(lambda: len(results) >= 50, "the first acknowledgements")
        snapshot = WatchThread(cb.watch(include_snapshot=True))
        feeder.join(WAIT)
        assert not feeder.is_alive()
        assert sorted(r.revision for r in results) == list(range(1, count + 1))
        for run in range(7):  # each run's updates in request order (across runs, see the batch-order test)
            revisions = [r.revision for r in results[run::7]]
            assert revisions == sorted(revisions)
        snapshot.wait_for_revision(count)
        events = snapshot.all_events()
        snapshot.close()
        (complete,) = [i for i, e in enumerate(events) if e.snapshot_complete]
        assert events[complete].revision < count  # the snapshot was taken mid-stream: live updates followed it
        state: dict[int, svc.RunUpdate] = {}
        for event in events[:complete]:
            assert event.update is not None
            state[event.update.run.job_run_id] = event.update
        after = [e.revision for e in events[complete + 1 :]]
        assert after == list(range(events[complete].revision + 1, count + 1))  # live: from the snapshot on, once each
        for event in events[complete + 1 :]:
            assert event.update is not None
            state[event.update.run.job_run_id] = event.update
        assert sorted(state.values(), key=lambda u: u.revision) == sorted(cb.list(), key=lambda u: u.revision)
        assert {u.run.error for u in state.values()} == {f"n{index}" for index in range(count - 7, count)}


@pytest.mark.parametrize(
    ("target", "allowed"),
    [
        pytest.param(
            "ipv4:127.0.0.1:1,127.0.0.1:2",
            True,
            id="ipv4-loopback-pair",
        ),
        pytest.param("ipv4:127.0.0.1:1,10.0.0.5:2", False, id="ipv4-loopback-and-remote"),
        pytest.param("ipv6:[::1]:1,[::1]:2", True, id="ipv6-loopback-pair"),
        pytest.param(
            "ipv6:[::1]:1,[2001:db8::1]:2",
            False,
            id="ipv6-loopback-and-remote",
        ),
    ],
)
def test_a_plaintext_token_goes_to_a_multi_address_target_only_if_every_address_is_loopback(
    target: str, allowed: bool
) -> None:
    if allowed:
        RunUpdateClient(target, token="secret").close()
    else:
        with pytest.raises(ConfigurationError, match="plaintext"):
            RunUpdateClient(target, token="secret").close()


class Publisher:
    """Publishes distinct updates through one client on a thread until told to stop; keeps what was acknowledged."""

    def __init__(self, client: RunUpdateClient, source: str) -> None:
        self.client = client
        self.source = source
        self.acked: dict[int, str] = {}  # revision -> the update's note
        self.errors: list[ServiceError] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"publisher-{source}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for index in itertools.count():
            if self.stop.is_set():
                return
            note = f"{self.source}-{index}"
            try:
                result = self.client.publish(
                    from_rest({"jobRunId": index % 5, "status": "kRunning", "error": note}), source=self.source
                )
            except ServiceError as exc:
                self.errors.append(exc)
                self.stop.wait(0.05)
                continue
            assert result.changed
            self.acked[result.revision] = note

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


@pytest.mark.slow
def test_sigkill_of_a_replica_under_a_watcher_fails_over_without_gap(
    nats_server: NatsNode, replicas: Callable[..., ServiceReplica]
) -> None:
    """the watch's target lists both replicas; the one it uses is killed mid-stream."""
    stream, prefix = names()
    url = f"{nats_server.url}?stream={stream}&subject_prefix={prefix}"
    a, b = replicas(url, "a"), replicas(url, "b")
    fast = ReconnectPolicy(initial_delay=0.05, max_delay=0.5, timeout=WAIT)
    # pick_first takes the first address (A) and moves to the next when it fails.
    target = f"ipv4:{a.address},{b.address}"
    with (
        RunUpdateClient(target, timeout=WAIT, reconnect=fast) as watcher_client,
        RunUpdateClient(target, timeout=5) as c_either,
        RunUpdateClient(a.address, timeout=5) as ca,
        RunUpdateClient(b.address, timeout=5) as cb,
    ):
        watch = WatchThread(watcher_client.watch(start_revision=1))
        pub_a, pub_b, pub_either = Publisher(ca, "via-a"), Publisher(cb, "via-b"), Publisher(c_either, "via-either")
        publishers = (pub_a, pub_b, pub_either)
        try:
            wait_until(lambda: all(len(p.acked) >= 20 for p in publishers), "publishes on both replicas")
            watch.wait_for_revision(max(pub_a.acked))
            a.kill()  # SIGKILL, while the watch streams through it and pub_a publishes through it
            at_kill = {p.source: len(p.acked) for p in publishers}
            wait_until(
                lambda: (
                    len(pub_b.acked) >= at_kill["via-b"] + 30 and len(pub_either.acked) >= at_kill["via-either"] + 30
                ),
                "publishes through B and through the two-address target after the kill",
            )
            wait_until(lambda: len(pub_a.errors) >= 1, "publishes through A to fail")
        finally:
            for publisher in publishers:
                publisher.halt()
        try:
            last = max(*pub_a.acked, *pub_b.acked, *pub_either.acked)
            watch.wait_for_revision(last)
            delivered = {u.revision: u for u in watch.updates()}
            # Once each, in order, no gap: every message of the stream up to the last acknowledged one.
            assert_gapless_once(watch.revisions())
            for publisher in publishers:
                for revision, note in publisher.acked.items():
                    assert delivered[revision].run.error == note
                    assert delivered[revision].source == publisher.source
            assert watch.watch.reconnects >= 1  # it was on A, and resumed on B
            assert {e.code for e in pub_a.errors} == {"UNAVAILABLE"}, pub_a.errors
            assert not pub_b.errors, pub_b.errors
            assert {e.code for e in pub_either.errors} <= {"UNAVAILABLE"}, (
                pub_either.errors
            )  # at most the one in flight
            messages = asyncio.run(stream_messages([nats_server.url], stream))
            assert [m.update for m in messages][: len(delivered)] == list(delivered.values())
        finally:
            watch.close()


@pytest.mark.slow
def test_a_replica_killed_between_its_two_writes_is_repaired_on_the_next_publish_and_on_start(
    nats_server: NatsNode, replicas: Callable[..., ServiceReplica], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish stored in the history but not yet in the bucket, and its replica SIGKILLed right there.

    The test hook stops a publish between its two writes; the process is then
    killed. The publish was never acknowledged; the next publish of the run
    (on another replica) and the next start of any replica copy the update
    into the bucket, so GetRun and ListRuns show it.
    """
    stream, prefix = names()
    url = f"{nats_server.url}?stream={stream}&subject_prefix={prefix}"
    monkeypatch.setenv(PAUSE_HOOK_ENV, "held")
    a = replicas(url, "a")
    monkeypatch.delenv(PAUSE_HOOK_ENV)
    b = replicas(url, "b")

    def record(job_run_id: int, note: str) -> pb.ProtectionShellInfo:
        return from_rest({"jobRunId": job_run_id, "status": "kRunning", "error": note})

    def held_publish(job_run_id: int) -> None:
        """Publish through A, which stops between the writes; SIGKILL A there. The publish fails."""
        before = len(asyncio.run(stream_messages([nats_server.url], stream)))
        failures: list[ServiceError] = []

        def publish() -> None:
            with RunUpdateClient(a.address, timeout=5) as client:
                try:
                    client.publish(record(job_run_id, "held"), source="agent")
                except ServiceError as exc:
                    failures.append(exc)

        thread = threading.Thread(target=publish, daemon=True)
        thread.start()
        wait_until(lambda: "stopped between the two writes" in a.log.read_text(), "A to stop between the writes")
        assert len(asyncio.run(stream_messages([nats_server.url], stream))) == before + 1  # in the history
        a.kill()
        thread.join(WAIT)
        assert not thread.is_alive()
        assert [f.code for f in failures] == ["UNAVAILABLE"], failures  # never acknowledged

    with RunUpdateClient(b.address, timeout=WAIT) as cb:
        assert cb.publish(record(7, "first"), source="agent").revision == 1
        held_publish(7)  # revision 2: in the history, not in the bucket
        assert cb.get(7, source="agent").revision == 1  # the bucket is behind until a repair
        # The agent retries on B: the history is ahead of the bucket, so B repairs it; the
        # retried update is the one stored, so the publish is a no-op returning its revision.
        again = cb.publish(record(7, "held"), source="agent")
        assert (again.revision, again.changed) == (2, False)
        got = cb.get(7, source="agent")
        assert (got.revision, got.run.error) == (2, "held")

        # Repair on start: A stops between the writes of a new run, is killed, and starts again.
        monkeypatch.setenv(PAUSE_HOOK_ENV, "held")
        a.log.write_text("")
        a.start()
        monkeypatch.delenv(PAUSE_HOOK_ENV)
        held_publish(8)  # revision 3
        with pytest.raises(ServiceError) as missing:
            cb.get(8, source="agent")
        assert missing.value.code == "NOT_FOUND"  # a new run: only in the history so far
        a.start()  # without the hook; its start repairs the bucket
        with RunUpdateClient(a.address, timeout=WAIT) as ca:
            for client in (ca, cb):
                got = client.get(8, source="agent")
                assert (got.revision, got.run.error) == (3, "held")
                assert [(u.run.job_run_id, u.revision) for u in client.list()] == [(7, 2), (8, 3)]
            assert "copied 1 run(s) the history had ahead of it" in a.log.read_text()
            # The run goes on from the repaired state, on either replica.
            assert ca.publish(record(8, "next"), source="agent").revision == 4
            assert cb.get(8, source="agent").run.error == "next"


# --- a three-node cluster -------------------------------------------------------------------


@pytest.mark.slow
def test_r3_stream_keeps_every_acknowledged_update_when_its_leader_dies(tmp_path: Path) -> None:
    """a burst on an R3 stream; the stream leader is SIGKILLed mid-burst."""
    stream, prefix = names()
    with cluster_of_three(tmp_path / "cluster") as cluster:
        url = cluster.store_url(stream=stream, subject_prefix=prefix, replicas=3)

        async def main() -> None:
            store = open_store(url)
            heard = Heard(store)
            async with started(store):
                async with jetstream(cluster.urls) as jsm:
                    info = await jsm.stream_info(stream)
                assert info.config.num_replicas == 3
                leader = info.cluster.leader
                assert leader in {"n1", "n2", "n3"}
                assert len(info.cluster.replicas) == 2

                acked: dict[int, str] = {}
                failures: list[BaseException] = []
                stop = asyncio.Event()

                async def publisher(number: int) -> None:
                    for index in itertools.count():
                        if stop.is_set():
                            return
                        note = f"p{number}-{index}"
                        try:
                            outcome = await store.publish("burst", shell(number * 10 + index % 4, error=note))
                        except StoreUnavailable as exc:
                            failures.append(exc)
                            await asyncio.sleep(0.05)
                            continue
                        except Exception as exc:  # anything else is a failure of the test
                            failures.append(exc)
                            return
                        assert outcome.changed
                        acked[outcome.update.revision] = note

                tasks = [asyncio.create_task(publisher(n)) for n in range(8)]
                try:
                    await until(lambda: len(acked) >= 150, "acknowledged publishes before the kill")
                    await asyncio.to_thread(cluster.node(leader).kill)
                    at_kill = len(acked)
                    await until(lambda: len(acked) >= at_kill + 150, "publishes after the leader died", 30)
                finally:
                    stop.set()
                    await asyncio.gather(*tasks)
                assert all(isinstance(f, StoreUnavailable) for f in failures), failures

                last = max(acked)
                # Reads make an ordered consumer, which can time out for a while after the
                # failover even once publishes go through again: UNAVAILABLE, to be retried.
                history = await retry_unavailable(lambda: store.history(1, 1_000_000, 1_000_000))
                assert_gapless_once([u.revision for u in history])
                assert history[-1].revision >= last
                by_revision = {u.revision: u for u in history}
                for revision, note in acked.items():
                    assert by_revision[revision].run.error == note
                messages = await stream_messages(cluster.urls, stream)
                assert [m.update for m in messages] == history
                assert_chained(messages)
                # The replica's live feed went on past the failover, once each, in order.
                await until(lambda: store.head_revision() >= history[-1].revision, "the store to follow the stream")
                assert heard.revisions == [u.revision for u in history]
                async with jetstream([n.url for n in cluster.nodes if n.name != leader]) as jsm:
                    assert (await jsm.stream_info(stream)).cluster.leader not in {None, leader}

            # The killed node comes back and catches up (its /healthz checks its stream replicas).
            await asyncio.to_thread(cluster.node(leader).start)

        asyncio.run(main())


# --- NATS down --------------------------------------------------------------------------------


@pytest.mark.slow
def test_service_rides_out_nats_being_down(own_nats: NatsNode, replicas: Callable[..., ServiceReplica]) -> None:
    """NATS stops under a running service and an open watch, then comes back."""
    stream, prefix = names()
    replica = replicas(f"{own_nats.url}?stream={stream}&subject_prefix={prefix}&timeout=1", "only")
    with RunUpdateClient(replica.address, timeout=WAIT) as client:
        watch = WatchThread(client.watch(start_revision=1, reconnect=ReconnectPolicy(max_delay=0.5, timeout=WAIT)))
        try:
            acked: dict[int, str] = {}

            def publish(note: str) -> None:
                result = client.publish(from_rest({"jobRunId": 1, "status": "kRunning", "error": note}))
                assert result.changed
                acked[result.revision] = note

            for index in range(5):
                publish(f"before-{index}")
            watch.wait_for_revision(5)

            own_nats.kill()
            refused = []
            for index in range(3):
                with pytest.raises(ServiceError) as caught:
                    publish(f"down-{index}")
                refused.append(f"down-{index}")
                assert (caught.value.code, caught.value.reason) == ("UNAVAILABLE", "STORE_UNAVAILABLE")
            with pytest.raises(ServiceError) as caught:
                client.get(1)
            assert caught.value.code == "UNAVAILABLE"

            own_nats.start()  # same port, same JetStream directory
            deadline = time.monotonic() + WAIT
            while True:  # the service reconnects by itself; until then, publishes are UNAVAILABLE
                try:
                    publish("back-0")
                    break
                except ServiceError as exc:
                    error = exc
                assert error.code == "UNAVAILABLE", error
                assert time.monotonic() < deadline, "the service did not recover"
                time.sleep(0.1)
            for index in range(1, 6):
                publish(f"back-{index}")

            last = max(acked)
            watch.wait_for_revision(last)
            assert_gapless_once(watch.revisions())
            delivered = {u.revision: u.run.error for u in watch.updates()}
            assert {revision: delivered[revision] for revision in acked} == acked
            messages = asyncio.run(stream_messages([own_nats.url], stream))
            assert [m.seq for m in messages] == watch.revisions()
            assert_chained(messages)
            # A publish that failed may still have been stored when NATS came back (its
            # message was queued by the NATS client): never the other way round.
            assert set(delivered.values()) - set(acked.values()) <= set(refused)
            # The outage is said once, and its end with the count of failed attempts (not a line per attempt).
            log = replica.log.read_text()
            assert log.count("said once") == 1, log
            assert re.search(r"reconnected after [1-9]\d* failed attempt", log), log
        finally:
            watch.close()
