"""The history reader of the NATS store (stores/_jetstream_reader.py) on real nats-server processes.

A replica with no in-memory window (``window_mib=0``) reads every catch-up
from JetStream: through the reader, or through nats-py when the reader
cannot serve the connection. Both must return exactly the same thing:

* over ranges crossing pull and call boundaries, with foreign messages (not
  RunUpdates) and deleted messages (gaps) in the stream;
* on servers with user/password, token and TLS;
* with connection options the reader does not do (it falls back, quietly);
* when the reader's connection dies mid-read or the server restarts (a
  correct fallback or an error, never a silent loss);
* with retention trimming the history between the check and the read
  (HistoryExpired).

One cursor (pull consumer) serves a whole catch-up. A stand-in server on a
socket checks that a peer that does not speak NATS turns the reader off.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nats
import pytest
from certs import make_pki
from nats.js import api
from nats_fixtures import NatsNode, free_ports, require_nats_server

from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as svc
from shellinfo_grpc.errors import HistoryExpired, StoreUnavailable
from shellinfo_grpc.stores import Retention
from shellinfo_grpc.stores import _jetstream_reader as reader_module
from shellinfo_grpc.stores._jetstream_reader import JetStreamReader, ReaderUnavailable, revision_field, with_revision
from shellinfo_grpc.stores._registry import open_store
from shellinfo_grpc.stores.nats import NatsStore

pytestmark = pytest.mark.timeout(120)

WAIT = 20.0


# --- servers ------------------------------------------------------------------------------------


@dataclass(eq=False)
class SecuredNode(NatsNode):
    """A nats-server with extra command-line options (auth, TLS), and the client URL that gets in."""

    extra: tuple[str, ...] = ()
    userinfo: str = ""
    scheme: str = "nats"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.userinfo + '@' if self.userinfo else ''}127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [*super().argv(), *self.extra]

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():  # the monitoring port needs no credentials
            assert self.running, "nats-server exited"
            assert time.monotonic() < deadline, "nats-server not healthy"
            await asyncio.sleep(0.1)


@contextlib.contextmanager
def secured(directory: Path, *extra: str, userinfo: str = "", scheme: str = "nats") -> Iterator[SecuredNode]:
    port, http_port = free_ports(2)
    node = SecuredNode(
        require_nats_server(), "secured", directory, port, http_port, extra=extra, userinfo=userinfo, scheme=scheme
    )
    node.start()
    try:
        yield node
    finally:
        node.kill()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredNode]:
    with secured(tmp_path_factory.mktemp("nats")) as node:
        yield node


@pytest.fixture
def small_pulls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pulls of 97 messages, so that a few hundred updates cross many pull boundaries."""
    monkeypatch.setattr(reader_module, "PULL_MESSAGES", 97)


# --- helpers ------------------------------------------------------------------------------------


def names() -> str:
    tag = uuid.uuid4().hex[:12]
    return f"stream=T{tag.upper()}&subject_prefix=test.{tag}.runs&window_mib=0"


@contextlib.asynccontextmanager
async def connection(servers: list[str], **options: Any) -> AsyncIterator[Any]:
    """A plain nats-py connection of the test's own (to publish foreign messages, delete, inspect)."""
    nc = await nats.connect(servers, **options)
    try:
        yield nc
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def started(url: str, **kwargs: Any) -> AsyncIterator[NatsStore]:
    store = open_store(url, **kwargs)
    assert isinstance(store, NatsStore)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


class Spy:
    """Counts the reads through the reader, the pulls through nats-py and the consumers made for cursors."""

    def __init__(self, store: NatsStore) -> None:
        self.reads = self.pulls = self.cursors = 0
        pull = store._pull

        async def count_pull(*args: Any) -> Any:
            self.pulls += 1
            return await pull(*args)

        store._pull = count_pull  # type: ignore[method-assign]
        reader = store._reader
        if reader is not None:
            read, cursor = reader.read, reader._create_consumer

            async def count_cursor(*args: Any) -> Any:
                self.cursors += 1
                return await cursor(*args)

            reader._create_consumer = count_cursor

            async def count_read(*args: Any) -> Any:
                self.reads += 1
                return await read(*args)

            reader.read = count_read  # type: ignore[method-assign]


async def fill(store: NatsStore, count: int, *, foreign_every: int = 0, delete_every: int = 0) -> int:
    """``count`` updates, a foreign message after every ``foreign_every``-th, every ``delete_every``-th
    deleted again (the 4th, ...); the head revision."""
    subject = store._subjects("src", 1)[0]
    async with connection([store._servers[0]], **store._connect_options) as nc:
        js, jsm = nc.jetstream(), nc.jsm()
        for index in range(count):
            run = pb.ProtectionShellInfo(job_run_id=index % 50, status=1, error=f"e{index}")
            outcome = await store.publish("src", run)
            if foreign_every and index % foreign_every == 0:
                await js.publish(subject, b"\xff\xff\xff not a RunUpdate", stream=store._stream)
            if delete_every and index % delete_every == 3:
                await jsm.delete_msg(store._stream, outcome.update.revision)
        return int((await jsm.stream_info(store._stream)).state.last_seq)


async def catch_up(store: NatsStore, start: int, end: int, limit: int) -> list[tuple[int, bytes]]:
    """Read ``[start, end]`` in calls of ``limit``, as the service's catch-up does."""
    out: list[tuple[int, bytes]] = []
    position = start
    while position <= end:
        chunk = await store.history_wire(position, end, limit)
        if not chunk:
            break
        out += chunk
        position = chunk[-1][0] + 1
    return out


async def through_nats_py(store: NatsStore, start: int, end: int, limit: int) -> list[tuple[int, bytes]]:
    reader, store._reader = store._reader, None
    try:
        return await catch_up(store, start, end, limit)
    finally:
        store._reader = reader


def decoded(chunk: list[tuple[int, bytes]]) -> list[svc.RunUpdate]:
    updates = [svc.RunUpdate.FromString(data) for _, data in chunk]
    assert [u.revision for u in updates] == [r for r, _ in chunk]
    return updates


# --- the parser, without a server ------------------------------------------------------------------

_BOUNDARIES = (1, 127, 128, 16383, 16384, 16385, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**35 + 3)


@pytest.mark.parametrize("seq", _BOUNDARIES)
def test_the_revision_field_sets_the_revision(seq: int) -> None:
    payload = svc.RunUpdate(source="s", run=pb.ProtectionShellInfo(job_run_id=7)).SerializeToString()
    assert svc.RunUpdate.FromString(payload + revision_field(seq)).revision == seq
    assert with_revision(payload, seq) == payload + revision_field(seq)


@pytest.mark.parametrize("step", [7, 100, 1 << 20])
def test_the_parser_appends_the_revision_and_notes_gaps_across_split_reads(step: int) -> None:
    """Deliveries with sequences around each varint boundary, as HMSG and MSG, fed ``step`` bytes at a time."""
    wire = reader_module._Wire(reader_module.Endpoint("h", 1, None, None, None, False), "S")
    wire.open = True
    start = _BOUNDARIES[0]
    cursor = reader_module._Cursor(wire, "c", 1, start, _BOUNDARIES[-1])
    cursor.exhausted = True  # no pulls: there is no server
    wire.cursors[1] = cursor
    frames, expected = [], []
    for index, seq in enumerate(_BOUNDARIES):
        payload = svc.RunUpdate(source="s", run=pb.ProtectionShellInfo(job_run_id=seq)).SerializeToString()
        reply = f"$JS.ACK.S.c.1.{seq}.{index + 1}.1700000000000000000.0".encode()
        if index % 3 == 2:  # stored without headers
            frames.append(b"MSG test.x 1 %s %d\r\n%s\r\n" % (reply, len(payload), payload))
        else:
            headers = b"NATS/1.0\r\nNats-Expected-Last-Subject-Sequence: 0\r\n\r\n"
            frames.append(
                b"HMSG test.x 1 %s %d %d\r\n%s%s\r\n"
                % (reply, len(headers), len(headers) + len(payload), headers, payload)
            )
        expected.append((seq, payload + revision_field(seq)))
    data = b"".join(frames)
    for at in range(0, len(data), step):
        wire.data_received(data[at : at + step])
    assert cursor.error is None
    assert cursor.received == expected
    assert cursor.last == _BOUNDARIES[-1]
    # every sequence after a jump is missing from the one after the previous message
    assert cursor.gaps == [a + 1 for a, b in itertools.pairwise(_BOUNDARIES) if b != a + 1]


@pytest.mark.parametrize("code", [b"404 No Messages", b"408 Request Timeout"])
def test_a_no_messages_status_ends_the_pull_in_flight_without_failing(code: bytes) -> None:
    """Older nats-servers end a no-wait pull with 408 where newer ones say 404: both mean no more for now."""
    wire = reader_module._Wire(reader_module.Endpoint("h", 1, None, None, None, False), "S")
    wire.open = True
    cursor = reader_module._Cursor(wire, "c", 1, 1, 100)
    wire.cursors[1] = cursor
    cursor.pulls, cursor.target = 1, 10  # a pull of 10 in flight (there is no server to ask)
    frames = []
    for seq in (1, 2):
        payload = svc.RunUpdate(source="s", run=pb.ProtectionShellInfo(job_run_id=seq)).SerializeToString()
        headers = b"NATS/1.0\r\n\r\n"
        reply = f"$JS.ACK.S.c.1.{seq}.{seq}.1700000000000000000.0".encode()
        frames.append(
            b"HMSG test.x 1 %s %d %d\r\n%s%s\r\n" % (reply, len(headers), len(headers) + len(payload), headers, payload)
        )
    status = b"NATS/1.0 " + code + b"\r\n\r\n"
    frames.append(b"HMSG %s.1.1 1 %d %d\r\n%s\r\n" % (wire.prefix.encode(), len(status), len(status), status))
    wire.data_received(b"".join(frames))
    assert cursor.error is None
    assert (cursor.target, cursor.exhausted) == (0, True)  # a read hands out 1 and 2 and asks again
    assert [seq for seq, _ in cursor.received] == [1, 2]


# --- the same as nats-py ---------------------------------------------------------------------------


@pytest.mark.usefixtures("small_pulls")
def test_the_reader_returns_what_nats_py_returns_across_pulls_gaps_and_foreign_messages(
    plain: SecuredNode, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with started(f"{plain.url}?{names()}") as store:
            head = await fill(store, 600, foreign_every=37, delete_every=41)
            spy = Spy(store)
            for start, limit in ((1, 333), (1, 50), (17, 1000), (head - 5, 4)):
                got = await catch_up(store, start, head, limit)
                assert spy.pulls == 0, "the reader fell back"
                reference = await through_nats_py(store, start, head, limit)
                assert got == reference, (start, limit)
                spy.pulls = 0
            everything = await catch_up(store, 1, head, 333)
            revisions = [r for r, _ in everything]
            assert len(revisions) == 600 - len(range(3, 600, 41))  # foreign messages skipped, deleted ones gone
            assert revisions == sorted(set(revisions))
            assert all(u.source == "src" for u in decoded(everything))
            # One cursor for the whole catch-up of 600 updates in calls of 333.
            before = spy.cursors
            await catch_up(store, 1, head, 333)
            assert spy.cursors == before + 1
            assert any("is not a RunUpdate; skipped" in r.message for r in caplog.records)

    asyncio.run(main())


def test_messages_stored_without_headers_come_as_msg_frames_and_are_read_too(plain: SecuredNode) -> None:
    """A foreign publisher's message without headers is delivered as MSG, not HMSG: skipped, loudly, by the reader."""

    async def main() -> None:
        async with started(f"{plain.url}?{names()}") as store:
            async with connection([plain.url]) as nc:
                for index in range(40):
                    await store.publish("src", pb.ProtectionShellInfo(job_run_id=index, status=1))
                    if index % 9 == 0:  # a bare message (no headers), a RunUpdate or not
                        update = svc.RunUpdate(source="bare", run=pb.ProtectionShellInfo(job_run_id=index))
                        data = update.SerializeToString() if index % 2 else b"\xff\xff bare"
                        await nc.publish(store._subjects("bare", index)[0], data)
                        await nc.flush()
                head = int((await nc.jsm().stream_info(store._stream)).state.last_seq)
            spy = Spy(store)
            got = await catch_up(store, 1, head, 16)
            assert spy.pulls == 0, "the reader fell back"
            assert got == await through_nats_py(store, 1, head, 16)
            assert [u.source for u in decoded(got)].count("bare") == 2  # 9 and 27; 0, 18, 36 are foreign
            assert len(got) == 42

    asyncio.run(main())


def test_consecutive_calls_share_one_consumer_and_drop_it_at_the_end(plain: SecuredNode) -> None:
    async def main() -> None:
        async with started(f"{plain.url}?{names()}") as store:
            head = await fill(store, 300)
            async with jetstream_manager(plain) as jsm:
                feeds = (await jsm.stream_info(store._stream)).state.consumer_count  # the live feed's
                spy = Spy(store)
                assert [r for r, _ in await catch_up(store, 1, head, 40)] == list(range(1, head + 1))
                assert (spy.cursors, spy.pulls) == (1, 0)
                assert spy.reads == -(-head // 40)
                for _ in range(100):  # the delete is not awaited by the reader
                    if (await jsm.stream_info(store._stream)).state.consumer_count == feeds:
                        break
                    await asyncio.sleep(0.05)
                assert (await jsm.stream_info(store._stream)).state.consumer_count == feeds

    asyncio.run(main())


@contextlib.asynccontextmanager
async def jetstream_manager(node: NatsNode, **options: Any) -> AsyncIterator[Any]:
    async with connection([node.url], **options) as nc:
        yield nc.jsm()


# --- authentication and TLS -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "userinfo"),
    [
        pytest.param(("--user", "reader", "--pass", "s3cret"), "reader:s3cret", id="user-password"),
        pytest.param(("--auth", "t0ken"), "t0ken", id="token"),
    ],
)
@pytest.mark.usefixtures("small_pulls")
def test_the_reader_authenticates_as_nats_py_does(tmp_path: Path, extra: tuple[str, ...], userinfo: str) -> None:
    async def main(node: SecuredNode) -> None:
        async with started(f"{node.url}?{names()}") as store:
            head = await fill(store, 250, foreign_every=60)
            spy = Spy(store)
            got = await catch_up(store, 1, head, 100)
            assert spy.pulls == 0
            assert spy.reads >= 3
            assert got == await through_nats_py(store, 1, head, 100)
            assert len(got) == 250

    with secured(tmp_path, *extra, userinfo=userinfo) as node:
        asyncio.run(main(node))


def test_the_reader_speaks_tls_when_the_server_requires_it(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = ("--tls", "--tlscert", str(pki.server.cert), "--tlskey", str(pki.server.key))

    async def main(node: SecuredNode) -> None:
        async with started(f"{node.url}?{names()}&tls_ca={pki.ca.cert}") as store:
            head = await fill(store, 200)
            spy = Spy(store)
            got = await catch_up(store, 1, head, 64)
            assert (spy.pulls, spy.cursors) == (0, 1)
            assert got == await through_nats_py(store, 1, head, 64)
            wire = store._reader._wire if store._reader is not None else None
            assert wire is not None
            assert wire.transport is not None
            assert wire.transport.get_extra_info("ssl_object") is not None

    with secured(tmp_path / "nats", *tls, scheme="tls") as node:
        asyncio.run(main(node))


def test_connection_options_the_reader_does_not_do_mean_nats_py_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As with a creds file (user_credentials): any option besides tls leaves the reader out."""
    caplog.set_level("DEBUG", logger="shellinfo_grpc.nats_store")

    async def main(node: SecuredNode) -> None:
        options = {"user": "reader", "password": "s3cret"}
        stream = f"T{uuid.uuid4().hex[:8].upper()}"
        store = NatsStore([node.url], stream=stream, connect_options=options, window_mib=0)
        await store.start()
        try:
            assert store._reader is None
            head = await fill(store, 150)
            spy = Spy(store)
            got = await catch_up(store, 1, head, 100)
            assert spy.pulls >= 2
            assert [r for r, _ in got] == list(range(1, head + 1))
        finally:
            await store.close()

    with secured(tmp_path, "--user", "reader", "--pass", "s3cret") as node:
        asyncio.run(main(node))
    said = [r for r in caplog.records if "through nats-py" in r.message]
    assert len(said) == 1
    assert said[0].levelname == "DEBUG"
    assert "password" in said[0].message
    assert "s3cret" not in said[0].message


def test_a_creds_file_in_the_store_url_goes_to_nats_py(tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text("not read here")
    store = open_store(f"nats://127.0.0.1:1?creds={creds}")
    assert isinstance(store, NatsStore)
    assert "user_credentials" in store._connect_options  # which start() leaves to nats-py (test above)


# --- failures -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("small_pulls")
def test_a_reader_connection_killed_mid_read_falls_back_with_nothing_lost(plain: SecuredNode) -> None:
    async def main() -> None:
        async with started(f"{plain.url}?{names()}") as store:
            head = await fill(store, 500)
            reference = await through_nats_py(store, 1, head, 200)
            spy = Spy(store)
            assert store._reader is not None
            wire_class = reader_module._Wire
            received = wire_class.data_received
            frames = 0

            def cut(self: Any, data: bytes) -> None:  # the socket dies after a few reads
                nonlocal frames
                frames += self.open
                received(self, data)
                if frames == 3 and self.transport is not None:
                    self.transport.abort()

            wire_class.data_received = cut  # type: ignore[method-assign]
            try:
                got = await catch_up(store, 1, head, 200)
            finally:
                wire_class.data_received = received  # type: ignore[method-assign]
            assert got == reference
            assert spy.pulls > 0, "the read that lost its connection went through nats-py"
            # The next catch-up opens a new connection and reads through the reader again.
            spy.pulls = 0
            assert await catch_up(store, 1, head, 200) == reference
            assert spy.pulls == 0

    asyncio.run(main())


@pytest.mark.usefixtures("small_pulls")
def test_a_server_restart_mid_catch_up_is_an_error_or_the_right_data(tmp_path: Path) -> None:
    async def main(node: SecuredNode) -> None:
        async with started(f"{node.url}?{names()}") as store:
            head = await fill(store, 400)
            reference = await through_nats_py(store, 1, head, 150)
            first = await store.history_wire(1, head, 150)
            assert first == reference[:150]
            await asyncio.get_running_loop().run_in_executor(None, node.restart)
            position, got = first[-1][0] + 1, list(first)
            deadline = time.monotonic() + WAIT
            while position <= head:
                try:
                    chunk = await store.history_wire(position, head, 150)
                except StoreUnavailable:  # an error, never a silent loss
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
                    continue
                got += chunk
                position = chunk[-1][0] + 1
            assert got == reference

    with secured(tmp_path) as node:
        asyncio.run(main(node))


def count_oldest_checks(store: NatsStore) -> list[int]:
    """From now on, count the store's oldest-revision round trips (the list's one item)."""
    checks = [0]
    oldest = store._oldest

    async def counted() -> tuple[int, int]:
        checks[0] += 1
        return await oldest()

    store._oldest = counted  # type: ignore[method-assign]
    return checks


@pytest.mark.usefixtures("small_pulls")
def test_history_trimmed_between_the_check_and_the_read_is_history_expired(plain: SecuredNode) -> None:
    async def main() -> None:
        async with started(f"{plain.url}?{names()}", retention=Retention(300)) as store:
            head = await fill(store, 300)
            first = await store.history_wire(1, head, 50)
            assert [r for r, _ in first] == list(range(1, 51))
            # The cursor holds what it read ahead (up to 194); then retention trims past it.
            for index in range(250):
                await store.publish("src", pb.ProtectionShellInfo(job_run_id=1000 + index, status=1))
            checks = count_oldest_checks(store)
            # The calls continue the cursor: no check before the read. 51..150 had been read
            # ahead before the trim: they are still right (as SQLite's read-ahead rows are).
            assert [r for r, _ in await store.history_wire(51, head, 100)] == list(range(51, 151))
            assert checks == [0]
            # The cursor's next pull starts at 195, trimmed: the consumer skips to 251, and
            # that gap is checked (one check), not taken for a deletion, and the cursor dropped.
            with pytest.raises(HistoryExpired) as caught:
                await store.history_wire(151, head, 60)  # kept: the next starts at 267
            assert checks == [1]
            assert (caught.value.requested, caught.value.oldest_revision) == (195, 251)
            assert store._reader is not None
            assert not store._reader._cursors, "the cursor that met the trim is kept"

    asyncio.run(main())


def test_an_idle_cursor_is_dropped_and_a_later_call_checks_the_oldest_revision(
    plain: SecuredNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An abandoned catch-up's cursor (and what it read ahead) is not served after retention trimmed past it."""
    monkeypatch.setattr(reader_module, "IDLE", 0.3)

    async def main() -> None:
        async with started(f"{plain.url}?{names()}", retention=Retention(300)) as store:
            head = await fill(store, 300)
            assert [r for r, _ in await store.history_wire(1, head, 50)] == list(range(1, 51))
            assert store._reader is not None
            assert store._reader.continues(51)
            for index in range(400):  # retention trims 1..400
                await store.publish("src", pb.ProtectionShellInfo(job_run_id=1000 + index, status=1))
            await asyncio.sleep(0.5)
            checks = count_oldest_checks(store)
            with pytest.raises(HistoryExpired) as caught:
                await store.history_wire(51, head, 100)
            assert checks == [1]
            assert (caught.value.requested, caught.value.oldest_revision) == (51, 401)
            assert not store._reader._cursors

    asyncio.run(main())


@pytest.mark.usefixtures("small_pulls")
def test_with_an_age_limit_every_call_checks_the_oldest_revision(plain: SecuredNode) -> None:
    """An update past the age limit counts as gone before JetStream removes it: no gap shows that."""

    async def main() -> None:
        async with started(f"{plain.url}?{names()}", retention=Retention(max_age_seconds=3600)) as store:
            head = await fill(store, 120)
            assert [r for r, _ in await store.history_wire(1, head, 50)] == list(range(1, 51))
            checks = count_oldest_checks(store)
            assert [r for r, _ in await store.history_wire(51, head, 50)] == list(range(51, 101))
            assert checks == [1]

    asyncio.run(main())


@pytest.mark.parametrize("path", ["reader", "nats-py", "warm-up"])
def test_a_deleted_message_at_the_end_of_a_range_ends_the_read_at_once(plain: SecuredNode, path: str) -> None:
    """The consumer skips the deleted message at ``end`` to a newer one: the range is done, nothing is waited for."""

    async def main() -> None:
        async with started(f"{plain.url}?{names()}&timeout=2") as store:
            await fill(store, 20)
            async with jetstream_manager(plain) as jsm:
                await jsm.delete_msg(store._stream, 10)
            spy = Spy(store)
            reader = store._reader
            if path == "nats-py":
                store._reader = None
            began = time.monotonic()
            try:
                if path == "warm-up":
                    got = await store._read_all(1, 10)
                else:
                    got = await store.history_wire(1, 10, 100)
                    assert await store.history_wire(10, 10, 100) == []
                    assert [r for r, _ in await store.history_wire(8, 10, 100)] == [8, 9]
                    assert [r for r, _ in await store.history_wire(5, 10, 3)] == [5, 6, 7]
            finally:
                store._reader = reader
            assert time.monotonic() - began < 1.5, "the read waited for the deleted message"
            assert [r for r, _ in got] == list(range(1, 10))
            if path != "nats-py":
                assert spy.pulls == 0, "the reader fell back"

    asyncio.run(main())


@pytest.mark.parametrize("path", ["reader", "nats-py"])
def test_a_deleted_tail_of_the_stream_ends_the_read_at_once(plain: SecuredNode, path: str) -> None:
    """The newest messages were deleted and nothing came after them: the range holds nothing more."""

    async def main() -> None:
        async with started(f"{plain.url}?{names()}&timeout=2") as store:
            head = await fill(store, 20)
            async with jetstream_manager(plain) as jsm:
                for seq in (19, 20):
                    await jsm.delete_msg(store._stream, seq)
            reader = store._reader
            if path == "nats-py":
                store._reader = None
            began = time.monotonic()
            try:
                got = await store.history_wire(15, head, 100)
                assert await store.history_wire(19, head, 100) == []
            finally:
                store._reader = reader
            assert time.monotonic() - began < 1.5, "the read waited for the deleted messages"
            assert [r for r, _ in got] == [15, 16, 17, 18]

    asyncio.run(main())


def test_a_closed_reader_stays_closed(plain: SecuredNode) -> None:
    """After close(), a read (or a scan) raises, lastingly, and opens no connection again."""

    async def main() -> None:
        async with started(f"{plain.url}?{names()}") as store:
            head = await fill(store, 30)
            reader, url = store._reader, urlparse(plain.url)
            assert reader is not None
            assert len((await reader.read(url, 1, head, 10)).records) == 10
            reader.close()
            assert reader.paused
            with pytest.raises(ReaderUnavailable) as caught:
                await reader.read(url, 11, head, 10)
            assert caught.value.lasting
            with pytest.raises(ReaderUnavailable):
                await reader.scan(url, store._stream, "none", None, lambda _batch: None)
            assert reader._wire is None
            reader.failed(caught.value)  # what the store does next: it stays closed
            with pytest.raises(ReaderUnavailable):
                await reader.read(url, 11, head, 10)
            assert reader._wire is None

    asyncio.run(main())


def test_a_peer_that_does_not_speak_nats_turns_the_reader_off() -> None:
    async def main() -> None:
        async def greet(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def no_consumer(_start: int) -> str:
            raise AssertionError("not reached")

        reader = JetStreamReader("S", no_consumer, tls=None, timeout=2.0)
        try:
            with pytest.raises(ReaderUnavailable) as caught:
                await reader.read(urlparse(f"nats://127.0.0.1:{port}"), 1, 10, 10)
            assert caught.value.lasting
            reader.failed(caught.value)
            assert reader.paused
        finally:
            reader.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


# --- start-up scans -------------------------------------------------------------------------------


async def fill_runs(store: NatsStore, runs: int, behind: int) -> None:
    """``runs`` runs in the store's format (history, then the bucket entry, except for the last ``behind``),
    a foreign message on each stream, and run 5's entry deleted (a KV delete marker)."""
    async with connection([store._servers[0]]) as nc:
        js = nc.jetstream()
        for index in range(runs):
            source = f"src-{index % 3}"
            update = svc.RunUpdate(source=source, run=pb.ProtectionShellInfo(job_run_id=index, error=f"e{index}"))
            history, latest = store._subjects(source, index)
            ack = await js.publish(history, update.SerializeToString(), stream=store._stream)
            if index < runs - behind:
                update.revision = ack.seq
                headers = {"Shellinfo-Revision": str(ack.seq)}
                await js.publish(latest, update.SerializeToString(), stream=store._latest_stream, headers=headers)
        await js.publish(f"{store._prefix}.sZm9v.notanumber", b"\xff foreign", stream=store._stream)
        await js.publish(f"{store._latest_prefix}.sZm9v.12", b"no revision header", stream=store._latest_stream)
        kv = await js.key_value(store._bucket)
        await kv.delete(store._subjects("src-2", 5)[1].split(".", 2)[2])


def test_start_up_scans_build_the_index_nats_py_builds(
    plain: SecuredNode, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The scan path and the nats-py path give the same index (keys, revisions, bucket sequences), sorted;
    the runs whose history is ahead are repaired; keys written between the scan and the live feed are kept."""
    monkeypatch.setattr(reader_module, "SCAN_PULL", 257)  # many pulls

    async def main() -> None:
        url = f"{plain.url}?{names()}"
        async with started(url):
            pass  # stream and bucket
        first = open_store(url)
        assert isinstance(first, NatsStore)
        await fill_runs(first, 1500, behind=7)
        with caplog.at_level("WARNING", logger="shellinfo_grpc.nats_store"):
            async with started(url) as scanned:
                assert "copied 8 run(s)" in caplog.text  # the last 7 and run 5 (deleted entry)
                assert scanned._keys == sorted(scanned._latest)
                assert len(scanned._keys) == 1500
        caplog.clear()

        # nats-py: the reader fails the scans (a protocol surprise); the index is the same.
        store = open_store(url)
        assert isinstance(store, NatsStore)
        calls: list[str] = []

        async def refuse(_url: Any, stream: str, _consumer: str, _header: Any, _each: Any) -> Any:
            calls.append(stream)
            raise ReaderUnavailable("test: no scan")

        await store.start()
        try:
            reference = (dict(store._latest), list(store._keys), store._latest_feed.position)
        finally:
            await store.close()
        fallback = open_store(url)
        assert isinstance(fallback, NatsStore)
        original = NatsStore._scan

        async def scan_refused(self: NatsStore, *args: Any) -> Any:
            assert self._reader is not None
            self._reader.scan = refuse  # type: ignore[method-assign]
            return await original(self, *args)

        monkeypatch.setattr(NatsStore, "_scan", scan_refused)
        await fallback.start()
        try:
            assert calls == [fallback._latest_stream, fallback._stream]  # both scans fell back
            assert (dict(fallback._latest), list(fallback._keys), fallback._latest_feed.position) == reference
            assert "copied" not in caplog.text
        finally:
            await fallback.close()
        monkeypatch.setattr(NatsStore, "_scan", original)

        # Keys written right after the scan, before the key feed starts: followed, each counted once.
        late = open_store(url)
        assert isinstance(late, NatsStore)

        async def scan_then_write(self: NatsStore, *args: Any) -> Any:
            out = await original(self, *args)
            if args[0] == self._latest_stream:
                async with connection([plain.url]) as nc:
                    js = nc.jetstream()
                    for job_run_id in (5, 2000, 2001):  # one known run written again, two new ones
                        subject = self._subjects("src-late", job_run_id)[1]
                        await js.publish(subject, b"", stream=self._latest_stream, headers={"Shellinfo-Revision": "9"})
            return out

        monkeypatch.setattr(NatsStore, "_scan", scan_then_write)
        await late.start()
        try:
            async with jetstream_manager(plain) as jsm:
                last = (await jsm.stream_info(late._latest_stream)).state.last_seq
            assert await late._latest_feed.reach(last, WAIT)
            assert late._keys == sorted(set(late._keys)) == sorted(late._latest)
            assert len(late._keys) == 1503
            assert {late._latest[("src-late", n)][0] for n in (5, 2000, 2001)} == {9}
        finally:
            await late.close()

    asyncio.run(main())


def test_a_scan_reads_the_last_message_of_every_subject(plain: SecuredNode) -> None:
    """The reader's scan on LAST_PER_SUBJECT: one (subject, sequence) per subject, the newest, every one."""

    async def main() -> None:
        async with started(f"{plain.url}?{names()}") as store:
            async with connection([plain.url]) as nc:
                js = nc.jetstream()
                for step in range(3):
                    for run in range(400):
                        await js.publish(f"{store._prefix}.s.{run}", b"x%d" % step, stream=store._stream)
            batches: list[list[Any]] = []
            assert await store._scan(store._stream, api.DeliverPolicy.LAST_PER_SUBJECT, batches.append)
            assert [entry for batch in batches for entry in batch] == [
                (f"{store._prefix}.s.{run}", 801 + run, None) for run in range(400)
            ]

    asyncio.run(main())


def test_a_scan_hands_its_messages_over_pull_by_pull_and_keeps_none(
    plain: SecuredNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch is at most a pull, comes before the scan ends, and the scan keeps nothing once it is handed on."""
    monkeypatch.setattr(reader_module, "SCAN_PULL", 50)

    async def main() -> None:
        async with started(f"{plain.url}?{names()}") as store:
            async with connection([plain.url]) as nc:
                js = nc.jetstream()
                for run in range(520):
                    await js.publish(f"{store._prefix}.s.{run}", b"x", stream=store._stream)
            wires: list[Any] = []
            original = reader_module._ScanWire.__init__

            def remember(self: Any, *args: Any) -> None:
                original(self, *args)
                wires.append(self)

            monkeypatch.setattr(reader_module._ScanWire, "__init__", remember)
            sizes: list[int] = []

            def each(batch: list[Any]) -> None:
                assert wires[0].found == []  # handed on, not kept
                sizes.append(len(batch))

            assert await store._scan(store._stream, api.DeliverPolicy.ALL, each)
            assert sum(sizes) == 520
            assert max(sizes) <= 50
            assert wires[0].pulls >= 11

    asyncio.run(main())


def test_a_scan_that_fails_midway_falls_back_to_the_index_and_repair_a_whole_scan_gives(
    plain: SecuredNode, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Both scans lose their connection after some batches went into the index (and the runs to repair): nats-py
    reads it all again; the index and the repair are those of a start whose scans went through, each run once."""
    monkeypatch.setattr(reader_module, "SCAN_PULL", 257)

    async def main() -> None:
        url = f"{plain.url}?{names()}"
        async with started(url):
            pass  # stream and bucket
        first = open_store(url)
        assert isinstance(first, NatsStore)
        await fill_runs(first, 1500, behind=7)

        original_pull = reader_module._ScanWire._pull

        def lost_at_the_third_pull(self: Any) -> None:
            if self.pulls == 2:
                raise ReaderUnavailable("test: connection lost mid-scan")
            original_pull(self)

        original_scan = NatsStore._scan
        handed: dict[str, int] = {}
        results: dict[str, bool] = {}

        async def counted(self: NatsStore, stream: str, deliver: Any, each: Any, *rest: Any) -> bool:
            def count(batch: list[Any]) -> None:
                handed[stream] = handed.get(stream, 0) + len(batch)
                each(batch)

            results[stream] = await original_scan(self, stream, deliver, count, *rest)
            return results[stream]

        monkeypatch.setattr(reader_module._ScanWire, "_pull", lost_at_the_third_pull)
        monkeypatch.setattr(NatsStore, "_scan", counted)
        failing = open_store(url)
        assert isinstance(failing, NatsStore)
        with caplog.at_level("INFO", logger="shellinfo_grpc.nats_store"):
            await failing.start()
        try:
            assert results == {failing._latest_stream: False, failing._stream: False}
            assert handed == {failing._latest_stream: 2 * 257, failing._stream: 2 * 257}  # then lost
            assert caplog.text.count("start-up scan through nats-py") == 2
            assert "copied 8 run(s)" in caplog.text  # the last 7 and run 5 (deleted entry), once each
            assert failing._keys == sorted(set(failing._keys)) == sorted(failing._latest)
            assert len(failing._keys) == 1500
            async with jetstream_manager(plain) as jsm:
                state = (await jsm.stream_info(failing._latest_stream)).state
            last = state.last_seq
            assert await failing._latest_feed.reach(last, WAIT)
            fell_back = (dict(failing._latest), list(failing._keys), failing._latest_feed.position)
        finally:
            await failing.close()
        caplog.clear()

        monkeypatch.setattr(reader_module._ScanWire, "_pull", original_pull)
        handed.clear()
        results.clear()
        with caplog.at_level("INFO", logger="shellinfo_grpc.nats_store"):
            async with started(url) as whole:
                assert results == {whole._latest_stream: True, whole._stream: True}
                assert handed[whole._latest_stream] == state.messages
                assert "through nats-py" not in caplog.text
                assert "copied" not in caplog.text  # repaired by the first start
                assert (dict(whole._latest), list(whole._keys), whole._latest_feed.position) == fell_back

    asyncio.run(main())
