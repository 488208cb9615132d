"""Clumsy and hostile requests through a real server on 127.0.0.1 (issue 7.4-7.8, 7.10).

Every bad request, whatever bytes it is made of, is INVALID_ARGUMENT with a
reason and the field at fault named as docs/contract.md (4.5) says, never
UNKNOWN or INTERNAL; in a PublishRuns stream it is acknowledged with its
error and the stream goes on. Every accepted update can be read back by a
client with gRPC's default 4 MiB receive limit. A publisher that does not
read its acks is flow-controlled, a watcher that does not read at shutdown
still learns where to resume, and refusals and the shutdown are logged.

Requests are sent as raw bytes (a serializer that passes bytes through), so
that the tests can send what no generated stub would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import aio_test
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_client import ServerHost

from shellinfo_grpc import from_rest
from shellinfo_grpc._gen.shellinfo.v1 import protection_job_pb2 as job_pb
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as svc
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2_grpc as svc_grpc
from shellinfo_grpc.errors import ConfigurationError
from shellinfo_grpc.rest import REST_KEYS
from shellinfo_grpc.server import MAX_SOURCE_BYTES, SERVICE_NAME, RunningServer, ServerConfig, create_server
from shellinfo_grpc.stores.memory import MemoryStore

pytestmark = pytest.mark.timeout(120)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
#: What no request may ever get: the service failed instead of refusing.
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MAX_INT64 = (1 << 63) - 1
DEFAULT_CLIENT_LIMIT = 4 << 20


# --- a server on a thread, raw calls ---------------------------------------------------


def _same(data: bytes) -> bytes:
    return data


@dataclass
class Served:
    """A server on its own loop thread and a blocking channel with gRPC's default limits."""

    host: ServerHost
    running: RunningServer
    channel: grpc.Channel

    def unary(self, method: str) -> Any:
        return self.channel.unary_unary(f"/{SERVICE_NAME}/{method}", _same, _same)

    def stream(self, method: str) -> Any:
        return self.channel.unary_stream(f"/{SERVICE_NAME}/{method}", _same, _same)

    def publish_stream(self, requests: Sequence[bytes]) -> list[svc.PublishRunsResponse]:
        call = self.channel.stream_stream(f"/{SERVICE_NAME}/PublishRuns", _same, svc.PublishRunsResponse.FromString)
        return list(call(iter(requests), timeout=20))


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    host = ServerHost()
    running = host.start(MemoryStore())
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield Served(host, running, channel)
    finally:
        channel.close()
        host.close()


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    reason: str
    metadata: dict[str, str]
    fields: list[str]


def refusal(exc: grpc.RpcError) -> Refusal:
    """The code, ErrorInfo reason and metadata, and BadRequest fields of a failed call."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    reason, metadata, fields = "", {}, []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return Refusal(exc.code(), reason, metadata, fields)  # type: ignore[attr-defined]


def call_refused(served: Served, method: str, data: bytes) -> Refusal | None:
    """Send ``data`` as the request of ``method``; the refusal, or None when it was answered."""
    try:
        if method == "WatchRuns":
            next(iter(served.stream(method)(data, timeout=10)))
        else:
            served.unary(method)(data, timeout=10)
    except grpc.RpcError as exc:
        return refusal(exc)
    return None


def good_request(job_run_id: int) -> bytes:
    return svc.PublishRunsRequest(source="h", run=pb.ProtectionShellInfo(job_run_id=job_run_id)).SerializeToString()


# --- 7.8: invalid UTF-8 in any string field of any request -------------------------------

REQUESTS: dict[str, type[Message]] = {
    "PublishRun": svc.PublishRunRequest,
    "PublishRuns": svc.PublishRunsRequest,
    "GetRun": svc.GetRunRequest,
    "ListRuns": svc.ListRunsRequest,
    "WatchRuns": svc.WatchRunsRequest,
}


def string_paths(message: descriptor.Descriptor, depth: int = 0) -> Iterator[tuple[descriptor.FieldDescriptor, ...]]:
    """Every path from ``message`` down to a string field."""
    for fd in message.fields:
        if fd.type == fd.TYPE_STRING:
            yield (fd,)
        elif fd.type == fd.TYPE_MESSAGE and depth < 4:
            for rest in string_paths(fd.message_type, depth + 1):
                yield (fd, *rest)


STRING_FIELDS = [(method, path) for method, cls in REQUESTS.items() for path in string_paths(cls.DESCRIPTOR)]


def set_path(message: Message, path: Sequence[descriptor.FieldDescriptor], value: str) -> None:
    for fd in path[:-1]:
        container: Any = getattr(message, fd.name)
        message = container.add() if fd.is_repeated else container
        if isinstance(message, pb.ExtraRestKey) and path[-1].name == "json_value":
            message.key = "timezone"  # the extra key whose value is at fault
    last = path[-1]
    if last.is_repeated:
        getattr(message, last.name).append(value)
    else:
        setattr(message, last.name, value)


def expected_field(path: Sequence[descriptor.FieldDescriptor]) -> str:
    """docs/contract.md 4.5: REST keys for what the run carries, proto JSON names for the request."""
    names = [fd.name for fd in path]
    if names[0] != "run":
        return ".".join(fd.json_name for fd in path)
    if names[1] != "unrecognized":
        assert path[1].json_name in REST_KEYS
        return path[1].json_name
    if names[2] in ("status", "run_type"):
        return {"status": "status", "run_type": "runType"}[names[2]]
    return "timezone" if names[-1] == "json_value" else "run"  # an unreadable key names the run


def test_every_string_field_of_every_request_is_covered() -> None:
    covered = {(m, ".".join(fd.name for fd in p)) for m, p in STRING_FIELDS}
    assert ("PublishRun", "source") in covered
    assert ("PublishRuns", "run.unrecognized.extra_keys.json_value") in covered
    assert ("PublishRun", "job.job_name") in covered
    assert ("ListRuns", "page_token") in covered
    assert ("WatchRuns", "filter.sources") in covered


@FAST
@given(
    case=st.sampled_from(STRING_FIELDS),
    text=st.binary(min_size=1, max_size=30),
    bad=st.sampled_from([0xC0, 0xC1, 0xF5, 0xF8, 0xFE, 0xFF]),
    where=st.integers(0, 29),
)
def test_invalid_utf8_in_any_string_field_is_invalid_argument(
    served: Served, case: tuple[str, tuple[descriptor.FieldDescriptor, ...]], text: bytes, bad: int, where: int
) -> None:
    method, path = case
    invalid = bytearray(text)
    invalid[where % len(invalid)] = bad  # a byte that is never valid UTF-8
    placeholder = "P" * len(invalid)
    request = REQUESTS[method]()
    set_path(request, path, placeholder)
    data = request.SerializeToString()
    assert data.count(placeholder.encode()) == 1
    data = data.replace(placeholder.encode(), bytes(invalid))
    in_run = path[0].name == "run"
    expected = expected_field(path)
    if method == "PublishRuns":
        head = served.running.store.head_revision()
        acks = served.publish_stream([good_request(1), data, good_request(2)])
        assert [ack.index for ack in acks] == [0, 1, 2]
        assert not acks[0].HasField("error")
        assert not acks[2].HasField("error")
        error = acks[1].error
        assert (error.code, error.reason) == (INVALID.value[0], "INVALID_RUN" if in_run else "INVALID_REQUEST")
        assert [v.field for v in error.field_violations] == [expected]
        assert served.running.store.head_revision() <= head + 2
        return
    found = call_refused(served, method, data)
    assert found is not None
    reason = "INVALID_RUN" if in_run and method == "PublishRun" else "INVALID_REQUEST"
    assert (found.code, found.reason, found.fields) == (INVALID, reason, [expected])


# --- 7.8: garbage bytes -----------------------------------------------------------------


@FAST
@given(method=st.sampled_from(["PublishRun", "GetRun", "ListRuns"]), data=st.binary(max_size=300))
def test_garbage_bytes_are_refused_or_answered_never_failed(served: Served, method: str, data: bytes) -> None:
    found = call_refused(served, method, data)
    if found is not None:
        assert found.code not in NEVER
        assert found.reason, f"{found.code} without a reason"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=100))
def test_garbage_watch_requests_are_refused_or_answered_never_failed(served: Served, data: bytes) -> None:
    found = call_refused(served, "WatchRuns", data)
    if found is not None:
        assert found.code in {INVALID, grpc.StatusCode.OUT_OF_RANGE}, found
        assert found.reason


def test_a_request_that_is_not_a_message_names_no_field(served: Served) -> None:
    found = call_refused(served, "GetRun", b"\xff\xff\xff")
    assert found == Refusal(INVALID, "INVALID_REQUEST", {}, [])


# --- 7.8: page tokens that decode to anything -------------------------------------------


def token_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=MAX_INT64 + 1, max_value=1 << 200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
)
TOKEN_TEXTS = st.one_of(
    JSON_VALUES.map(json.dumps),
    # The shape of a token, with a filter key of another filter or values out of range.
    st.tuples(st.text(max_size=10), st.integers(), st.text(min_size=1, max_size=10)).map(lambda t: json.dumps(list(t))),
    st.tuples(st.text(max_size=10), st.integers(MAX_INT64 + 1, 1 << 100), st.just("")).map(
        lambda t: json.dumps(list(t))
    ),
    st.just('["\\ud800", 1, ""]'),  # a lone surrogate: no UTF-8 form
    st.integers(1, 100_000).map(lambda n: "[" * n + "]" * n),  # deep nesting
    st.integers(1, 20_000).map(lambda n: "9" * n),  # huge numbers
)


@FAST
@given(text=TOKEN_TEXTS)
def test_a_page_token_that_decodes_to_anything_unexpected_is_invalid_argument(served: Served, text: str) -> None:
    with_filter = svc.ListRunsRequest(page_token=token_of(text)).SerializeToString()
    found = call_refused(served, "ListRuns", with_filter)
    assert found == Refusal(INVALID, "INVALID_REQUEST", {}, ["pageToken"])


@FAST
@given(token=st.text(max_size=6000))
def test_any_page_token_text_is_invalid_argument(served: Served, token: str) -> None:
    assume(token.strip())
    found = call_refused(served, "ListRuns", svc.ListRunsRequest(page_token=token).SerializeToString())
    assert found == Refusal(INVALID, "INVALID_REQUEST", {}, ["pageToken"])


# --- 7.8: out-of-range options ------------------------------------------------------------


@FAST
@given(
    case=st.one_of(
        st.integers(-(1 << 31), -1).map(lambda n: ("ListRuns", svc.ListRunsRequest(page_size=n), "pageSize")),
        st.integers(-(1 << 63), -1).map(
            lambda n: ("WatchRuns", svc.WatchRunsRequest(start_revision=n), "startRevision")
        ),
        st.integers(-(1 << 31), -1).map(
            lambda n: ("WatchRuns", svc.WatchRunsRequest(progress_interval_ms=n), "progressIntervalMs")
        ),
        st.integers(1, MAX_INT64).map(
            lambda n: ("WatchRuns", svc.WatchRunsRequest(include_snapshot=True, start_revision=n), "includeSnapshot")
        ),
    )
)
def test_out_of_range_request_fields_name_their_proto_json_name(served: Served, case: tuple[str, Message, str]) -> None:
    method, request, field = case
    found = call_refused(served, method, request.SerializeToString())
    assert found == Refusal(INVALID, "INVALID_REQUEST", {}, [field])


def test_page_sizes_above_the_cap_are_answered(served: Served) -> None:
    for size in (1001, 1 << 20, (1 << 31) - 1):
        assert call_refused(served, "ListRuns", svc.ListRunsRequest(page_size=size).SerializeToString()) is None


# --- 7.6: a watch beyond the head + 1 -------------------------------------------------------


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(beyond=st.integers(2, MAX_INT64))
def test_a_watch_beyond_the_head_is_revision_in_future(served: Served, beyond: int) -> None:
    head = served.running.store.head_revision()
    start = min(head + beyond, MAX_INT64)
    found = call_refused(served, "WatchRuns", svc.WatchRunsRequest(start_revision=start).SerializeToString())
    assert found is not None
    assert (found.code, found.reason) == (grpc.StatusCode.OUT_OF_RANGE, "REVISION_IN_FUTURE")
    assert found.metadata["head_revision"] == str(head)
    assert found.metadata["requested_revision"] == str(start)


def test_a_watch_at_the_head_plus_one_is_valid(served: Served) -> None:
    head = served.running.store.head_revision()
    data = svc.WatchRunsRequest(start_revision=head + 1).SerializeToString()
    first = svc.WatchRunsResponse.FromString(next(iter(served.stream("WatchRuns")(data, timeout=10))))
    assert (list(first.updates), first.revision) == ([], head)


# --- 7.8: a bad request in the middle of a PublishRuns stream -------------------------------

ITEMS = st.sampled_from(["good", "utf8", "garbage", "long-source", "no-job-run-id", "final-changed"])


def stream_item(kind: str, n: int) -> bytes:
    if kind == "good":
        return good_request(1000 + n)
    if kind == "utf8":
        return good_request(1000 + n).replace(b"\x0a\x01h", b"\x0a\x01\xff")  # source "h" -> b"\xff"
    if kind == "garbage":
        return b"\x12\x02\xff" + bytes([n % 256])  # a run that is no message: wire type 7 or truncated
    if kind == "long-source":
        return svc.PublishRunsRequest(source="é" * 129, run=from_rest({"jobRunId": 1})).SerializeToString()
    if kind == "no-job-run-id":
        return svc.PublishRunsRequest(source="h", run=from_rest({"status": "kRunning"})).SerializeToString()
    return svc.PublishRunsRequest(
        source="final", run=from_rest({"jobRunId": 1, "status": "kFailure"})
    ).SerializeToString()


@FAST
@given(kinds=st.lists(ITEMS, min_size=1, max_size=12))
def test_bad_requests_in_a_publish_stream_are_acknowledged_and_the_stream_goes_on(
    served: Served, kinds: list[str]
) -> None:
    served.unary("PublishRun")(  # a run with a final status: changing it is RUN_FINAL
        svc.PublishRunRequest(source="final", run=from_rest({"jobRunId": 1, "status": "kSuccess"})).SerializeToString()
    )
    acks = served.publish_stream([stream_item(kind, n) for n, kind in enumerate(kinds)])
    assert [ack.index for ack in acks] == list(range(len(kinds)))
    for kind, ack in zip(kinds, acks, strict=True):
        if kind == "good":
            assert not ack.HasField("error")
            assert ack.revision > 0
            continue
        assert ack.HasField("error")
        assert ack.revision == 0
        expected = {
            "utf8": (INVALID, "INVALID_REQUEST", ["source"]),
            "garbage": (INVALID, "INVALID_RUN", ["run"]),
            "long-source": (INVALID, "INVALID_REQUEST", ["source"]),
            "no-job-run-id": (INVALID, "INVALID_RUN", ["jobRunId"]),
            "final-changed": (grpc.StatusCode.FAILED_PRECONDITION, "RUN_FINAL", ["status"]),
        }[kind]
        fields = [v.field for v in ack.error.field_violations]
        assert (ack.error.code, ack.error.reason, fields) == (expected[0].value[0], expected[1], expected[2])


# --- 7.5: sources and the size of the whole update ---------------------------------------------


@FAST
@given(source=st.text(st.characters(exclude_categories=["Cs"]), max_size=300))
def test_source_is_at_most_256_bytes_of_utf8(served: Served, source: str) -> None:
    request = svc.PublishRunRequest(source=source, run=from_rest({"jobRunId": 5}))
    found = call_refused(served, "PublishRun", request.SerializeToString())
    if len(source.encode()) <= MAX_SOURCE_BYTES:
        assert found is None
    else:
        assert found == Refusal(INVALID, "INVALID_REQUEST", {}, ["source"])


def largest_update(limit: int, job_run_id: int) -> svc.PublishRunRequest:
    """A publish whose whole update, at the largest revision and time, is exactly ``limit`` bytes."""
    job = job_pb.ProtectionJob(job_id=MAX_INT64, job_name="j" * 1000)

    def request(length: int) -> svc.PublishRunRequest:
        run = from_rest({"jobRunId": job_run_id, "status": "kRunning", "error": "e" * length})
        return svc.PublishRunRequest(source="s" * MAX_SOURCE_BYTES, run=run, job=job)

    def size(length: int) -> int:
        r = request(length)
        return svc.RunUpdate(
            source=r.source, run=r.run, job=r.job, revision=MAX_INT64, accepted_time_usecs=MAX_INT64
        ).ByteSize()

    length = limit - size(0)
    while size(length) > limit:
        length -= 1
    assert size(length) == limit
    return request(length)


def test_every_accepted_update_can_be_read_back_with_default_limits() -> None:
    """GetRun, a ListRuns page of up to 1000 and WatchRuns, each through a channel at gRPC's defaults."""
    host = ServerHost()
    try:
        config = ServerConfig()
        running = host.start(MemoryStore(), config)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:  # default 4 MiB receive limit
            stub = svc_grpc.RunUpdateServiceStub(channel)
            count = 6  # about 6 MiB: no page or response may hold them all
            for n in range(1, count + 1):
                stub.PublishRun(largest_update(config.max_run_bytes, n))
            over = largest_update(config.max_run_bytes, 99)
            over.run.error += "e"
            with pytest.raises(grpc.RpcError) as caught:
                stub.PublishRun(over)
            assert refusal(caught.value) == Refusal(INVALID, "RUN_TOO_LARGE", {}, ["run"])
            # A run that keeps its stored job is held to the limit with that job: run 1 has
            # a job; the same run without one, grown by what the job took, is refused.
            first = largest_update(config.max_run_bytes, 1)
            grown = svc.PublishRunRequest(source=first.source, run=first.run)
            grown.run.error += "e" * (first.job.ByteSize() + 2)
            with pytest.raises(grpc.RpcError) as caught:
                stub.PublishRun(grown)
            assert refusal(caught.value) == Refusal(INVALID, "RUN_TOO_LARGE", {}, ["run"])
            assert "with the job stored for the run" in caught.value.details()

            for n in range(1, count + 1):
                assert stub.GetRun(svc.GetRunRequest(source="s" * MAX_SOURCE_BYTES, job_run_id=n)).update.revision
            listed, token, pages = [], "", 0
            while True:
                page = stub.ListRuns(svc.ListRunsRequest(page_size=1000, page_token=token))
                assert page.ByteSize() < DEFAULT_CLIENT_LIMIT
                listed += [u.run.job_run_id for u in page.updates]
                token, pages = page.next_page_token, pages + 1
                if not token:
                    break
            assert listed == list(range(1, count + 1))
            assert pages > 1
            watched: list[int] = []
            for response in stub.WatchRuns(svc.WatchRunsRequest(start_revision=1), timeout=20):
                watched += [u.run.job_run_id for u in response.updates]
                if len(watched) == count:
                    break
            assert watched == list(range(1, count + 1))
    finally:
        host.close()


@pytest.mark.parametrize("setting", ["max_run_bytes", "max_batch_bytes"])
def test_limits_a_default_client_cannot_receive_are_refused(setting: str) -> None:
    with pytest.raises(ConfigurationError, match=setting):
        ServerConfig(**{setting: DEFAULT_CLIENT_LIMIT})
    with pytest.raises(ConfigurationError, match=setting):
        ServerConfig(**{setting: 0})


# --- 7.4: a publisher that never reads its acks ---------------------------------------------

#: A client that lets few unread acks pile up: a 64 KiB stream window that never grows.
SMALL_WINDOW = [
    ("grpc.http2.lookahead_bytes", 65535),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.use_local_subchannel_pool", 1),
]


@aio_test
async def test_a_publisher_that_does_not_read_its_acks_is_flow_controlled() -> None:
    running = await create_server("127.0.0.1:0", MemoryStore())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=SMALL_WINDOW)
    total = 200_000
    pad = "x" * 1000
    written = 0

    async def requests() -> Any:
        nonlocal written
        for n in range(total):
            yield svc.PublishRunsRequest(source="f", run=from_rest({"jobRunId": n + 1, "error": pad}))
            written += 1

    try:
        call = svc_grpc.RunUpdateServiceStub(channel).PublishRuns(requests())
        seen: list[tuple[int, int]] = []
        while len(seen) < 3 or seen[-1] != seen[-3]:  # unchanged for two looks in a row
            await asyncio.sleep(0.3)
            seen.append((written, running.store.head_revision()))
        stored = running.store.head_revision()
        # The server stopped taking requests (nothing more is stored), and
        # then stopped reading them (the client's writes wait): both are
        # bounded far below what the client wanted to send.
        assert stored < written < total
        assert written - stored < 20_000, "the server read far ahead of what it stored"
        call.cancel()
    finally:
        await channel.close()
        await running.stop(grace=0)


# --- 7.8: a stalled watcher at shutdown ------------------------------------------------------


async def stalled_watch_at_shutdown(grace: float, stalled_for: float) -> tuple[list[int], grpc.aio.AioRpcError]:
    """A watcher stops reading while 4 MB of updates go out; the server stops; the watcher reads again."""
    running = await create_server("127.0.0.1:0", MemoryStore(), ServerConfig(max_watch_queue=100_000))
    target = f"127.0.0.1:{running.port}"
    publisher = grpc.aio.insecure_channel(target)
    watcher = grpc.aio.insecure_channel(target, options=SMALL_WINDOW)
    try:
        call = svc_grpc.RunUpdateServiceStub(watcher).WatchRuns(svc.WatchRunsRequest())
        await call.read()  # "now": the watch is registered
        stub = svc_grpc.RunUpdateServiceStub(publisher)
        for n in range(200):
            await stub.PublishRun(
                svc.PublishRunRequest(source="w", run=from_rest({"jobRunId": n + 1, "error": "x" * 20_000}))
            )
        stopping = asyncio.create_task(running.stop(grace=grace))
        await asyncio.sleep(stalled_for)
        received: list[int] = []

        async def read_all() -> None:
            while (response := await call.read()) is not grpc.aio.EOF:
                received.extend(u.revision for u in response.updates)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_all()
        await stopping
        return received, caught.value
    finally:
        await publisher.close()
        await watcher.close()


@aio_test
async def test_a_stalled_watcher_learns_where_to_resume_at_shutdown() -> None:
    received, error = await stalled_watch_at_shutdown(grace=5.0, stalled_for=0.5)
    found = refusal(error)
    assert (found.code, found.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
    assert received
    assert received == list(range(1, len(received) + 1))
    assert len(received) < 200, "the watcher was not stalled"
    assert found.metadata == {"last_revision": str(received[-1])}


@aio_test
async def test_a_watcher_stalled_past_the_grace_period_is_cut_off_unavailable() -> None:
    """Its status waits behind data it does not read: past the grace the connection is closed."""
    received, error = await stalled_watch_at_shutdown(grace=0.3, stalled_for=1.0)
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # a client resumes from what it received
    assert received == list(range(1, len(received) + 1))


# --- 7.10: the log --------------------------------------------------------------------------


def test_refused_calls_and_the_shutdown_are_logged_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    host = ServerHost()
    caplog.set_level(logging.INFO, logger="shellinfo_grpc.server")
    try:
        running = host.start(MemoryStore(), ServerConfig(tokens=frozenset({"right-token"})))
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = svc_grpc.RunUpdateServiceStub(channel)
            good = (("authorization", "Bearer right-token"),)
            with pytest.raises(grpc.RpcError):
                stub.ListRuns(svc.ListRunsRequest(page_size=-1), metadata=good)
            with pytest.raises(grpc.RpcError):
                stub.GetRun(svc.GetRunRequest(job_run_id=1), metadata=(("authorization", "Bearer wrong-secret"),))
            bad_item = svc.PublishRunsRequest(source="s" * 300, run=from_rest({"jobRunId": 1}))
            (ack,) = stub.PublishRuns(iter([bad_item]), metadata=good)
            assert ack.HasField("error")
        host.stop(running)
    finally:
        host.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "shellinfo_grpc.server"]
    assert all("\n" not in line and "secret" not in line and "right-token" not in line for line in lines)
    refused = [line for line in lines if line.startswith("refused")]
    assert any("ListRuns" in x and "127.0.0.1" in x and "INVALID_ARGUMENT INVALID_REQUEST" in x for x in refused)
    assert any("GetRun" in x and "127.0.0.1" in x and "UNAUTHENTICATED" in x for x in refused)
    assert any("PublishRuns item 0" in x and "INVALID_ARGUMENT INVALID_REQUEST" in x for x in refused)
    assert any(line.startswith("stopping (asked to stop)") for line in lines)
    assert any(line.startswith("stopped (asked to stop)") for line in lines)


class _BrokenStore(MemoryStore):
    """A store with a fault of its own: reading a run raises what no caller expects."""

    async def get(self, source: str, job_run_id: int) -> svc.RunUpdate | None:
        raise RuntimeError("disk on fire: secret detail")


def test_a_failed_call_is_logged_one_line_without_the_details(caplog: pytest.LogCaptureFixture) -> None:
    host = ServerHost()
    caplog.set_level(logging.INFO, logger="shellinfo_grpc.server")
    try:
        running = host.start(_BrokenStore())
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                svc_grpc.RunUpdateServiceStub(channel).GetRun(svc.GetRunRequest(job_run_id=1))
            assert caught.value.code() == grpc.StatusCode.UNKNOWN
    finally:
        host.close()
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("failed")]
    assert len(failed) == 1
    assert "GetRun" in failed[0]
    assert "UNKNOWN RuntimeError" in failed[0]
    assert "secret" not in failed[0]


_SERVER_PROCESS = """
import asyncio
from shellinfo_grpc.server import create_server
from shellinfo_grpc.stores.memory import MemoryStore

async def main():
    running = await create_server("127.0.0.1:0", MemoryStore())
    print(running.port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_server_memory_stays_bounded_while_a_publisher_does_not_read_its_acks() -> None:
    """The server in a process of its own: its RSS grows by the updates it stored, not by what it was sent."""
    server = subprocess.Popen([sys.executable, "-c", _SERVER_PROCESS], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        before = _rss_mib(server.pid)
        run = {"error": "x" * 1000}

        async def publish_without_reading() -> tuple[int, int]:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=SMALL_WINDOW)
            written = 0

            async def requests() -> Any:
                nonlocal written
                for n in range(100_000):  # 100 MB, if the server took it all
                    yield svc.PublishRunsRequest(source="m", run=from_rest({"jobRunId": n + 1, **run}))
                    written += 1

            try:
                call = svc_grpc.RunUpdateServiceStub(channel).PublishRuns(requests())
                seen = [-1, -2]
                while seen[-1] != seen[-2]:  # until the writes wait
                    await asyncio.sleep(0.5)
                    seen.append(written)
                head = await svc_grpc.RunUpdateServiceStub(channel).WatchRuns(svc.WatchRunsRequest()).read()
                call.cancel()
                return written, head.revision
            finally:
                await channel.close()

        written, stored = asyncio.run(publish_without_reading())
        grown = _rss_mib(server.pid) - before
    finally:
        server.terminate()
        server.wait(10)
        if server.stdout is not None:
            server.stdout.close()
    assert stored < written < 100_000
    # What it stored (about 1 KiB each) and the read-ahead, not the 100 MB it was offered.
    assert grown < 64 + stored / 1024, f"server RSS grew {grown:.0f} MiB with {stored} updates stored"
