"""The run-update gRPC service (grpc.aio): publish, get, list and watch runs.

:func:`create_server` builds a ready-to-start server around a :class:`Store`;
:func:`serve` runs one until SIGTERM or SIGINT and shuts it down gracefully.
Both are what ``shellinfo serve`` uses.

Guarantees (README.md, "Guarantees", says the same for users):

* every accepted update has a revision, strictly increasing service-wide, and
  is acknowledged only once the store made it durable;
* a watcher receives matching updates once each, in revision order; a backlog
  is sent in batches, live updates at once;
* a watcher that falls more than ``max_watch_queue`` updates (or
  ``max_watch_queue_bytes`` bytes) behind is ended
  with RESOURCE_EXHAUSTED and the last revision it was sent, so it resumes
  without blocking publishers or other watchers;
* on shutdown, health turns NOT_SERVING, watchers end with UNAVAILABLE and
  in-flight publishes finish;
* a bad request, whatever its bytes, is INVALID_ARGUMENT naming the field at
  fault (an item of a PublishRuns stream is acknowledged with that error and
  the stream goes on), never UNKNOWN or INTERNAL;
* every accepted update, with all that is stored with it, fits what a client
  with gRPC's default 4 MiB receive limit can read back.

Refused and failed calls are logged at info, one line each (method, peer,
code, reason; never the request or a token), and so is stopping, with why.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import hmac
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, empty_pb2, message_factory
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_status import rpc_status

from shellinfo_grpc._fanout import Hub, batches, encode, serialize_response
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as _pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2_grpc as _svc_grpc
from shellinfo_grpc._jsonvalue import key_name
from shellinfo_grpc._status import (
    KEY_JOB_RUN_ID,
    KEY_SOURCE,
    REASON_INVALID_REQUEST,
    REASON_INVALID_RUN,
    REASON_RUN_NOT_FOUND,
    REASON_RUN_TOO_LARGE,
    REASON_SERVER_SHUTTING_DOWN,
    code_name,
    details,
    error_status,
    publish_error,
    status_proto,
)
from shellinfo_grpc.errors import ConfigurationError, RevisionInFuture, RunRejected, ServiceError, StoreUnavailable
from shellinfo_grpc.stores import Item, Store

if TYPE_CHECKING:
    from shellinfo_grpc.metrics import ServiceMetrics

__all__ = [
    "MAX_SOURCE_BYTES",
    "SERVICE_NAME",
    "RunUpdateServicer",
    "RunningServer",
    "ServerConfig",
    "TlsConfig",
    "create_server",
    "load_tokens",
    "method_handlers",
    "reflection_pool",
    "serve",
]

log = logging.getLogger("shellinfo_grpc.server")

_SERVICE: Final = _svc.DESCRIPTOR.services_by_name["RunUpdateService"]
SERVICE_NAME: Final = _SERVICE.full_name

#: Methods that need no bearer token: health checks, so that load balancers
#: and orchestrator probes work without credentials.
AUTH_EXEMPT: Final = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})

#: The longest ``source`` accepted on publish, in bytes of UTF-8.
MAX_SOURCE_BYTES: Final = 256

#: The largest message a client with gRPC's default limits receives.
_CLIENT_DEFAULT_RECEIVE: Final = 4 << 20
#: Room a response needs beyond the updates it carries (framing, page token).
_RESPONSE_HEADROOM: Final = 64 << 10
_MAX_INT64: Final = (1 << 63) - 1
_MAX_TOKEN_CHARS: Final = 4096
#: The bytes a stored RunUpdate has beyond its publish request, at their most:
#: revision and accepted_time_usecs. source, run and job have one-byte tags in
#: both messages, so the rest is the same size (the size tests pin this).
_ADDED_BY_SERVICE: Final = _svc.RunUpdate(revision=_MAX_INT64, accepted_time_usecs=_MAX_INT64).ByteSize()

_MAX_PAGE: Final = 1000
#: How long a watch beyond the head + 1 waits for the head before REVISION_IN_FUTURE.
_HEAD_WAIT_SECONDS: Final = 0.25
_HEAD_WAIT_STEPS: Final = 5
_DEFAULT_PAGE: Final = 100
_DEFAULT_PROGRESS_MS: Final = 5000
_MIN_PROGRESS_MS: Final = 100


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Server TLS from PEM files; with ``client_ca`` clients must present a
    certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """Read the PEM files and build the server credentials."""
        try:
            cert = self.cert.read_bytes()
            key = self.key.read_bytes()
            client_ca = self.client_ca.read_bytes() if self.client_ca else None
        except OSError as exc:
            raise ConfigurationError(f"TLS: cannot read {exc.filename}: {exc.strerror}") from None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of the service that are not the address or the store.

    ``max_watch_queue``: updates a watcher may fall behind before it is ended
    with RESOURCE_EXHAUSTED; ``max_watch_queue_bytes``: the same bound in
    bytes of pending responses. ``max_batch_updates``/``max_batch_bytes``: the
    most updates (and their approximate size) in one WatchRuns response.
    ``tokens``: accepted bearer tokens; empty means no authentication.
    ``shutdown_grace``: seconds in-flight calls get to finish on shutdown.
    ``max_run_bytes``: the largest accepted update, serialized as it is stored
    and sent (``RunUpdate``: the run, its source and job, revision and time),
    far below the 4 MiB a client with gRPC's default limits can receive, so
    that every accepted update can be read back and watched. It and
    ``max_batch_bytes`` must leave that client room, or the configuration is
    refused.
    """

    max_watch_queue: int = 10_000
    max_watch_queue_bytes: int = 64 << 20
    max_batch_updates: int = 1_000
    max_batch_bytes: int = 1 << 20
    tokens: frozenset[str] = frozenset()
    tls: TlsConfig | None = None
    shutdown_grace: float = 10.0
    max_receive_bytes: int = 4 << 20
    max_send_bytes: int = 16 << 20
    max_run_bytes: int = 1 << 20
    extra_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    #: Where to count publishes, watchers, the head revision and commit times (``--metrics-address``).
    metrics: ServiceMetrics | None = None

    def __post_init__(self) -> None:
        ceiling = _CLIENT_DEFAULT_RECEIVE - _RESPONSE_HEADROOM
        for name, value in (("max_run_bytes", self.max_run_bytes), ("max_batch_bytes", self.max_batch_bytes)):
            if not 0 < value <= ceiling:
                raise ConfigurationError(
                    f"{name} must be between 1 and {ceiling}, so that a client with gRPC's default"
                    f" 4 MiB limit can receive every update; got {value}"
                )

    def grpc_options(self) -> list[tuple[str, Any]]:
        """Channel options set on purpose: message sizes and keepalive policy."""
        return [
            ("grpc.max_receive_message_length", self.max_receive_bytes),
            ("grpc.max_send_message_length", self.max_send_bytes),
            # Ping idle clients every 60 s and drop them after 20 s of silence.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            # Accept client pings every 10 s or slower, also without active
            # calls (a watcher waiting for the next update is such a client).
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.so_reuseport", 0),
            *self.extra_options,
        ]


def load_tokens(path: Path) -> frozenset[str]:
    """Read bearer tokens from a file: one a line; blank lines and ``#`` comments are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigurationError(f"token file {path}: {exc.strerror}") from None
    tokens = frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise ConfigurationError(f"token file {path}: no tokens in it")
    return tokens


# --- errors -------------------------------------------------------------------

#: The rpc being served, for the log line of a refusal (set by the handler wrappers).
_METHOD: Final[contextvars.ContextVar[str]] = contextvars.ContextVar("shellinfo_method", default="?")


def _log_refusal(
    context: grpc.aio.ServicerContext[Any, Any], code: str, reason: str, *, item: int | None = None
) -> None:
    """One info line per refused call (or refused ``item`` of a PublishRuns stream):
    method, peer, code, reason; never the request."""
    method = _METHOD.get() if item is None else f"{_METHOD.get()} item {item}"
    log.info("refused %s from %s: %s %s", method, context.peer(), code, reason or "-")


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], proto: status_pb2.Status, *, logged: bool = True
) -> NoReturn:
    """End the call with ``proto``: its code, message and google.rpc details (and a log line unless not ``logged``)."""
    if logged:
        _log_refusal(context, code_name(proto.code), details(proto).reason)
    status = rpc_status.to_status(proto)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


def _invalid(field_name: str, description: str) -> status_pb2.Status:
    """INVALID_REQUEST naming a request field by its proto JSON name (docs/contract.md, 4.5)."""
    return status_proto(
        "INVALID_ARGUMENT",
        f"{field_name}: {description}",
        reason=REASON_INVALID_REQUEST,
        violations=[(field_name, description)],
    )


# --- reading requests -------------------------------------------------------------
#
# Requests arrive as bytes and are parsed here, not by gRPC: a request gRPC
# cannot deserialize (invalid UTF-8 in a string field, garbage) would end the
# call with INTERNAL, and in a PublishRuns stream end the whole stream.

_WIRE_LEN: Final = 2  # the wire type of strings and messages


def _fields(data: bytes) -> list[tuple[int, bytes]]:
    """(field number, payload) of each length-delimited field of ``data``; DecodeError when malformed.

    Read as fields of an empty message, all unknown, so that nothing is
    checked yet (strings stay bytes).
    """
    fields = UnknownFieldSet(empty_pb2.Empty.FromString(data))
    found = (fields[i] for i in range(len(fields)))
    return [(f.field_number, f.data) for f in found if f.wire_type == _WIRE_LEN]


def _fault(data: bytes, message: descriptor.Descriptor) -> list[tuple[descriptor.FieldDescriptor, bytes]]:
    """The path of fields down to the one that makes ``data`` unparsable, as far as it can be told."""
    try:
        fields = _fields(data)
    except (DecodeError, RecursionError):
        return []
    for number, payload in fields:
        fd = message.fields_by_number.get(number)
        if fd is None:
            continue
        if fd.type == fd.TYPE_STRING:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return [(fd, payload)]
        elif fd.type == fd.TYPE_MESSAGE and fd.message_type is not None:
            try:
                message_factory.GetMessageClass(fd.message_type).FromString(payload)
            except (DecodeError, RecursionError):
                return [(fd, payload), *_fault(payload, fd.message_type)]
    return []


def _violation_field(path: Sequence[tuple[descriptor.FieldDescriptor, bytes]]) -> str:
    """Name the field at fault (docs/contract.md, 4.5): REST keys in the run, proto JSON names elsewhere."""
    fields = [fd for fd, _ in path]
    if not fields:
        return ""
    if fields[0].name == "run" and fields[0].message_type is _pb.ProtectionShellInfo.DESCRIPTOR and len(fields) > 1:
        inner = fields[1]
        if inner.name != "unrecognized" or len(fields) < 3:
            return inner.json_name
        known = _pb.ProtectionShellInfo.DESCRIPTOR.fields_by_name.get(fields[2].name)
        if known is not None:  # unrecognized.status, unrecognized.run_type: that REST key
            return known.json_name
        # An extra key: named by the key itself when that much is readable.
        key_number = _pb.ExtraRestKey.DESCRIPTOR.fields_by_name["key"].number
        with contextlib.suppress(DecodeError, UnicodeDecodeError):
            keys = [p.decode("utf-8") for n, p in _fields(path[2][1]) if n == key_number]
            if keys and keys[-1]:
                return key_name(keys[-1])  # escaped and cut as rules names it: one printable line
        return "run"
    return ".".join(fd.json_name for fd in fields)


def _unparsable(data: bytes, message: descriptor.Descriptor) -> ServiceError:
    """The INVALID_ARGUMENT a request gets that does not parse as ``message``."""
    path = _fault(data, message)
    name = _violation_field(path)
    if path and path[-1][0].type == descriptor.FieldDescriptor.TYPE_STRING:
        description = "is not valid UTF-8"
    else:
        description = "is not a valid protobuf message"
    in_run = bool(path) and path[0][0].name == "run"
    reason = REASON_INVALID_RUN if in_run else REASON_INVALID_REQUEST
    if not name:
        return ServiceError("INVALID_ARGUMENT", reason, f"the request {description}")
    return ServiceError("INVALID_ARGUMENT", reason, f"{name}: {description}", [(name, description)])


def _parse(data: bytes, cls: type[Message], message: descriptor.Descriptor) -> Message | ServiceError:
    """``data`` parsed as ``cls``, or the error that says why it is not one."""
    try:
        return cls.FromString(data)
    except (DecodeError, RecursionError):
        return _unparsable(data, message)


# --- page tokens --------------------------------------------------------------


def _filter_key(flt: _svc.RunFilter) -> str:
    return base64.urlsafe_b64encode(flt.SerializeToString(deterministic=True)).decode()


def _encode_page_token(last: _svc.RunUpdate, flt: _svc.RunFilter) -> str:
    raw = json.dumps([last.source, last.run.job_run_id, _filter_key(flt)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _unencodable(text: str) -> bool:
    """Whether ``text`` has no UTF-8 form (a lone surrogate that JSON let through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _decode_page_token(token: str, flt: _svc.RunFilter) -> tuple[str, int]:
    """The (source, jobRunId) a page token continues after; ValueError for anything else.

    A token is the client's to send, so it may be anything: too long, not
    base64, not JSON, nested deeply, holding huge numbers or other types.
    """
    if len(token) > _MAX_TOKEN_CHARS:
        raise ValueError("not a token this service issued")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, RecursionError) as exc:
        raise ValueError("not a token this service issued") from exc
    if not (isinstance(value, list) and len(value) == 3):
        raise ValueError("not a token this service issued")
    source, job_run_id, key = value
    if not isinstance(source, str) or type(job_run_id) is not int or not isinstance(key, str):
        raise ValueError("not a token this service issued")
    if not -_MAX_INT64 - 1 <= job_run_id <= _MAX_INT64 or _unencodable(source):
        raise ValueError("not a token this service issued")
    if key != _filter_key(flt):
        raise ValueError("the filter differs from the one the token was issued for")
    return source, job_run_id


# --- the servicer ---------------------------------------------------------------


def _queued_size(item: _svc.PublishRunsRequest | ServiceError) -> int:
    """What a read-ahead request counts against the PublishRuns budget."""
    return item.ByteSize() if isinstance(item, Message) else len(item.message)


class RunUpdateServicer(_svc_grpc.RunUpdateServiceServicer):
    """Implements shellinfo.v1.RunUpdateService over a :class:`Store`."""

    def __init__(self, store: Store, config: ServerConfig) -> None:
        self._store = store
        self._config = config
        self._hub = Hub(
            store,
            max_queue=config.max_watch_queue,
            max_queue_bytes=config.max_watch_queue_bytes,
            max_batch_updates=config.max_batch_updates,
            max_batch_bytes=config.max_batch_bytes,
        )
        if config.metrics is not None:
            config.metrics.follow(store.head_revision, lambda: len(self._hub.watchers))

    def watcher_count(self) -> int:
        """How many watches are open now."""
        return len(self._hub.watchers)

    def close_watchers(self) -> None:
        """End every watch with UNAVAILABLE (shutdown), and refuse new ones."""
        self._hub.close()

    async def _publish(self, items: Sequence[Item], context: grpc.aio.ServicerContext[Any, Any]) -> list[Any]:
        metrics = self._config.metrics
        started = time.perf_counter()
        try:
            outcomes = await self._store.publish_batch(items)
        except StoreUnavailable as exc:
            if metrics is not None:
                metrics.failed(len(items))
            await _abort(context, error_status(exc))
        if metrics is not None:
            metrics.committed(outcomes, time.perf_counter() - started)
        return outcomes

    def _count_refused(self) -> None:
        if self._config.metrics is not None:
            self._config.metrics.refused()

    def _check_update(self, request: _svc.PublishRunRequest | _svc.PublishRunsRequest) -> None:
        """Refuse what could not be stored and read back: a long source, an update over the size limit.

        The limit covers the whole update as it is stored and sent (the run,
        its source and job, and the revision and time the service adds at
        their largest), so that every accepted update fits what a client with
        gRPC's default limits receives from GetRun, ListRuns and WatchRuns.
        """
        source_bytes = len(request.source.encode("utf-8"))
        if source_bytes > MAX_SOURCE_BYTES:
            why = f"{source_bytes} bytes of UTF-8; at most {MAX_SOURCE_BYTES}"
            self._count_refused()
            raise RunRejected("INVALID_ARGUMENT", REASON_INVALID_REQUEST, f"source: {why}", [("source", why)])
        size = request.ByteSize() + _ADDED_BY_SERVICE
        limit = self._config.max_run_bytes
        if size > limit:
            self._count_refused()
            raise RunRejected(
                "INVALID_ARGUMENT",
                REASON_RUN_TOO_LARGE,
                f"the update is {size} bytes serialized (run, source and job); the most accepted is {limit}",
                [("run", f"{size} bytes is over the limit of {limit}")],
            )

    async def PublishRun(
        self, request: _svc.PublishRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _svc.PublishRunResponse:
        """Record one update (see the proto for the rules)."""
        run = request.run  # unset: an empty run, which the store refuses (no jobRunId)
        try:
            self._check_update(request)
        except RunRejected as exc:
            await _abort(context, error_status(exc))
        job = request.job if request.HasField("job") else None
        (outcome,) = await self._publish([(request.source, run, job)], context)
        if isinstance(outcome, RunRejected):
            await _abort(context, error_status(outcome))
        return _svc.PublishRunResponse(revision=outcome.update.revision, changed=outcome.changed)

    async def PublishRuns(  # takes parsed requests or their errors, see method_handlers
        self,
        request_iterator: AsyncIterator[_svc.PublishRunsRequest | ServiceError],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[_svc.PublishRunsResponse]:
        """Record a stream of updates, acknowledging each in order.

        Requests are read ahead while earlier ones are being stored, and all
        that are waiting go to the store as one batch (one commit), which is
        what makes a busy agent's stream fast. A request that does not parse
        is acknowledged with its error, like a refused update; the stream goes on.

        Flow control: acks are yielded one at a time, and gRPC completes a
        write only once the client's receive window has room, so a publisher
        that stops reading its acks stops this loop, which stops taking
        requests from the read-ahead queue, which stops the reader: gRPC then
        stops reading the stream and the publisher's writes wait.
        """
        # Read-ahead is bounded by bytes (requests may be up to
        # max_receive_bytes each), not only by count.
        queue: asyncio.Queue[_svc.PublishRunsRequest | ServiceError | None] = asyncio.Queue(maxsize=1000)
        budget = max(4 * self._config.max_batch_bytes, self._config.max_receive_bytes)
        queued = 0
        room = asyncio.Event()
        room.set()

        async def read() -> None:
            nonlocal queued
            try:
                async for req in request_iterator:
                    await room.wait()
                    queued += _queued_size(req)
                    if queued >= budget:
                        room.clear()
                    await queue.put(req)
            finally:
                await queue.put(None)

        reader = asyncio.create_task(read())
        index = 0
        try:
            done = False
            while not done:
                batch = [await queue.get()]
                while not queue.empty() and len(batch) < 1000:
                    batch.append(queue.get_nowait())
                if batch[-1] is None:
                    done = True
                    batch.pop()
                requests = [r for r in batch if r is not None]
                queued -= sum(_queued_size(r) for r in requests)
                if queued < budget:
                    room.set()
                if not requests:
                    continue
                acks: list[_svc.PublishRunsResponse | None] = [None] * len(requests)
                items: list[Item] = []
                positions: list[int] = []
                for i, req in enumerate(requests):
                    try:
                        if isinstance(req, ServiceError):
                            raise req
                        self._check_update(req)
                    except ServiceError as exc:
                        acks[i] = _svc.PublishRunsResponse(index=index + i, error=publish_error(exc))
                        continue
                    items.append((req.source, req.run, req.job if req.HasField("job") else None))
                    positions.append(i)
                outcomes = await self._publish(items, context) if items else []
                for i, outcome in zip(positions, outcomes, strict=True):
                    if isinstance(outcome, RunRejected):
                        acks[i] = _svc.PublishRunsResponse(index=index + i, error=publish_error(outcome))
                    else:
                        acks[i] = _svc.PublishRunsResponse(
                            index=index + i, revision=outcome.update.revision, changed=outcome.changed
                        )
                index += len(requests)
                for ack in acks:
                    assert ack is not None
                    if ack.HasField("error"):
                        _log_refusal(context, code_name(ack.error.code), ack.error.reason, item=ack.index)
                    yield ack
            # The stream ended: if reading it failed (a request that does not
            # parse, say), the call fails too instead of ending with OK.
            await reader
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    async def _head_reaching(self, revision: int) -> int:
        """The store's head, after waiting a moment for it to reach ``revision``.

        A replica following a shared store (NATS) may be a little behind the
        one a watcher resumes from; only a head that stays behind is a store
        that was replaced or reset.
        """
        for _ in range(_HEAD_WAIT_STEPS):
            head = self._store.head_revision()
            if head >= revision:
                return head
            await asyncio.sleep(_HEAD_WAIT_SECONDS / _HEAD_WAIT_STEPS)
        return self._store.head_revision()

    async def GetRun(
        self, request: _svc.GetRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _svc.GetRunResponse:
        """Return the latest state of one run, or NOT_FOUND."""
        try:
            update = await self._store.get(request.source, request.job_run_id)
        except StoreUnavailable as exc:
            await _abort(context, error_status(exc))
        if update is None:
            await _abort(
                context,
                status_proto(
                    "NOT_FOUND",
                    f"no run with jobRunId {request.job_run_id} from source {request.source!r}",
                    reason=REASON_RUN_NOT_FOUND,
                    metadata={KEY_SOURCE: request.source, KEY_JOB_RUN_ID: str(request.job_run_id)},
                ),
            )
        return _svc.GetRunResponse(update=update)

    async def ListRuns(
        self, request: _svc.ListRunsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _svc.ListRunsResponse:
        """Return one page of the latest states of matching runs."""
        if request.page_size < 0:
            await _abort(context, _invalid("pageSize", "must not be negative"))
        size = min(request.page_size or _DEFAULT_PAGE, _MAX_PAGE)
        after = None
        if request.page_token:
            try:
                after = _decode_page_token(request.page_token, request.filter)
            except ValueError as exc:
                await _abort(context, _invalid("pageToken", str(exc)))
        flt = request.filter if request.HasField("filter") else None
        try:
            updates = await self._store.list_runs(flt, after, size + 1)
        except StoreUnavailable as exc:
            await _abort(context, error_status(exc))
        # A page ends at page_size runs or at max_batch_bytes, whichever comes
        # first, so that it fits what a client with default limits receives.
        first = next(iter(batches(encode(updates[:size]), size, self._config.max_batch_bytes)), [])
        page = [update for update, _ in first]
        more = len(updates) > len(page)
        token = _encode_page_token(page[-1], request.filter) if more else ""
        return _svc.ListRunsResponse(updates=page, next_page_token=token)

    async def WatchRuns(  # type: ignore[override]  # may yield pre-encoded bytes, see method_handlers
        self, request: _svc.WatchRunsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes | _svc.WatchRunsResponse]:
        """Stream matching updates: snapshot or history first, then live."""
        if request.start_revision < 0:
            await _abort(context, _invalid("startRevision", "must not be negative"))
        if request.include_snapshot and request.start_revision:
            await _abort(context, _invalid("includeSnapshot", "a snapshot starts from now: leave startRevision 0"))
        if request.progress_interval_ms < 0:
            await _abort(context, _invalid("progressIntervalMs", "must not be negative"))
        head = await self._head_reaching(request.start_revision - 1)
        if request.start_revision > head + 1:
            await _abort(context, error_status(RevisionInFuture(request.start_revision, head)))
        progress = max(request.progress_interval_ms or _DEFAULT_PROGRESS_MS, _MIN_PROGRESS_MS) / 1000
        flt = request.filter if request.HasField("filter") else None
        stream = self._hub.watch(flt, request.start_revision, request.include_snapshot, progress)
        try:
            async for response in stream:
                yield response
        except ServiceError as exc:  # the store failed, the history is gone, shutdown, too slow
            # Shutdown ends every watch: the stop line says how many, not one line each.
            await _abort(context, error_status(exc), logged=exc.reason != REASON_SERVER_SHUTTING_DOWN)


# --- authentication -------------------------------------------------------------


class _BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Requires ``authorization: Bearer <token>`` on every call but health checks."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = tuple(t.encode() for t in sorted(tokens))

    def _valid(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        header = b""
        for key, value in metadata or ():
            if key == "authorization":
                header = value.encode() if isinstance(value, str) else value
        scheme, _, token = header.partition(b" ")
        # Compare against every token, in constant time each, so neither the
        # position of a match nor its prefix shows in the timing.
        ok = False
        for candidate in self._tokens:
            ok |= hmac.compare_digest(candidate, token.strip())
        return ok and scheme.lower() == b"bearer"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in AUTH_EXEMPT:
            return handler
        if self._valid(handler_call_details.invocation_metadata):
            return handler
        return _deny(handler, handler_call_details.method)


def _deny(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
    message = "a valid bearer token is required (metadata 'authorization: Bearer <token>')"

    async def deny(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        _METHOD.set(method.rpartition("/")[2])
        _log_refusal(context, "UNAUTHENTICATED", "")  # the token itself is never logged
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await deny(_request, context)
        yield  # pragma: no cover - makes this an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny)


# --- assembling and running -------------------------------------------------------


#: How each kind of rpc is registered: (client streaming, server streaming) -> handler factory.
_HANDLER_KINDS: Final[dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _passthrough(data: bytes) -> bytes:
    """The request deserializer: the bytes as they came; the handler parses them (see "reading requests")."""
    return data


def _failed(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    """The log line of a call that failed on a fault of the service (gRPC answers UNKNOWN)."""
    log.info("failed %s from %s: UNKNOWN %s", _METHOD.get(), context.peer(), type(exc).__name__)


def _wrap(method: descriptor.MethodDescriptor, impl: Callable[..., Any]) -> Callable[..., Any]:
    """The handler gRPC calls for ``method``: parse the request bytes, call ``impl``, log a failure.

    A unary request that does not parse ends the call with INVALID_ARGUMENT;
    in a request stream each item is the parsed request or its
    :class:`ServiceError`, for the servicer to acknowledge.
    """
    name = method.name
    request_class = message_factory.GetMessageClass(method.input_type)
    request_type = method.input_type

    def parse(data: bytes) -> Message | ServiceError:
        return _parse(data, request_class, request_type)

    async def requests(stream: AsyncIterator[bytes]) -> AsyncIterator[Message | ServiceError]:
        async for data in stream:
            yield parse(data)

    async def request_of(data: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if method.client_streaming:
            return requests(data)
        parsed = parse(data)
        if isinstance(parsed, ServiceError):
            await _abort(context, error_status(parsed))
        return parsed

    if method.server_streaming:

        async def stream_handler(data: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            _METHOD.set(name)
            try:
                # Closed at once when the call ends (a cancelled watch unregisters now, not when collected).
                async with contextlib.aclosing(impl(await request_of(data, context), context)) as responses:
                    async for response in responses:
                        yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                _failed(context, exc)
                raise

        return stream_handler

    async def unary_handler(data: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        _METHOD.set(name)
        try:
            return await impl(await request_of(data, context), context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            _failed(context, exc)
            raise

    return unary_handler


def method_handlers(servicer: RunUpdateServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The handler of every rpc of the service, read from the service descriptor.

    Each rpc of the proto is registered with its streaming kind, so one added
    to the proto cannot be left out (it answers UNIMPLEMENTED until the
    servicer implements it). Requests reach the handlers as bytes and are
    parsed there (:func:`_wrap`), so that a request gRPC could not
    deserialize is INVALID_ARGUMENT, not INTERNAL. A handler may send
    pre-encoded bytes instead of a response message (WatchRuns does, see
    :mod:`shellinfo_grpc._fanout`).
    """
    handlers = {}
    for method in _SERVICE.methods:
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            _wrap(method, getattr(servicer, method.name)),
            request_deserializer=_passthrough,
            response_serializer=serialize_response,
        )
    return handlers


def _with_json_names(proto: descriptor_pb2.FileDescriptorProto, file: descriptor.FileDescriptor) -> None:
    """Write each field's JSON name into ``proto`` (protoc's Python output leaves them out)."""

    def fill(messages: Sequence[descriptor_pb2.DescriptorProto], by_name: Mapping[str, descriptor.Descriptor]) -> None:
        for message in messages:
            found = by_name[message.name]
            for fd in message.field:
                fd.json_name = found.fields_by_name[fd.name].json_name
            for ext in message.extension:
                ext.json_name = found.extensions_by_name[ext.name].json_name
            fill(message.nested_type, found.nested_types_by_name)

    fill(proto.message_type, file.message_types_by_name)
    for ext in proto.extension:
        ext.json_name = file.extensions_by_name[ext.name].json_name


def reflection_pool(files: Sequence[descriptor.FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """A pool with ``files`` and their dependencies, complete enough for any reflection client.

    Reflection serves file descriptors as the pool holds them; the default
    pool's, built from protoc's Python output, lack ``json_name``, so clients
    that build their schema from reflection (protobuf-es, buf curl, grpcurl)
    would read empty JSON names. Options (``rest_name``) are kept as they are.
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        _with_json_names(proto, file)
        pool.Add(proto)
        added.add(file.name)

    for file in files:
        add(file)
    return pool


def _add_service(servicer: RunUpdateServicer, server: grpc.aio.Server) -> None:
    """Register the service as the generated ``add_RunUpdateServiceServicer_to_server`` does."""
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


@dataclass(slots=True)
class RunningServer:
    """A started server, its bound port, and what shuts it down gracefully."""

    server: grpc.aio.Server
    port: int
    servicer: RunUpdateServicer
    health: health_aio.HealthServicer
    store: Store
    config: ServerConfig

    async def stop(self, grace: float | None = None, *, why: str = "asked to stop") -> None:
        """Graceful shutdown: NOT_SERVING, end watchers (UNAVAILABLE), let
        in-flight calls finish for ``grace`` seconds, then close the store.
        ``why`` goes to the log lines that say the server stops and stopped."""
        seconds = self.config.shutdown_grace if grace is None else grace
        watchers = self.servicer.watcher_count()
        log.info(
            "stopping (%s): port %d, %d watcher%s to end, %.1f s for calls in flight",
            why,
            self.port,
            watchers,
            "" if watchers == 1 else "s",
            seconds,
        )
        await self.health.enter_graceful_shutdown()
        self.servicer.close_watchers()
        await self.server.stop(seconds)
        await self.store.close()
        log.info("stopped (%s)", why)


async def create_server(address: str, store: Store, config: ServerConfig | None = None) -> RunningServer:
    """Start the store and a server bound to ``address`` (``HOST:PORT``; port 0 picks one).

    Returns a started :class:`RunningServer`; its ``port`` is the bound port.
    """
    cfg = config or ServerConfig()
    credentials = cfg.tls.credentials() if cfg.tls is not None else None  # fail before opening the store
    store.max_update_bytes = cfg.max_run_bytes
    await store.start()
    interceptors = [_BearerTokenInterceptor(cfg.tokens)] if cfg.tokens else []
    server = grpc.aio.server(options=cfg.grpc_options(), interceptors=interceptors)
    servicer = RunUpdateServicer(store, cfg)
    _add_service(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
        pool=reflection_pool([_svc.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR]),
    )
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        await store.close()
        raise ConfigurationError(f"cannot listen on {address}: {exc}") from None
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health.set("", serving)
    await health.set(SERVICE_NAME, serving)
    writes: set[asyncio.Task[None]] = set()  # health follows whether the store can write (it logs why)

    def follow_store(ok: bool, _why: str) -> None:
        for name in ("", SERVICE_NAME):
            task = asyncio.ensure_future(
                health.set(name, serving if ok else health_pb2.HealthCheckResponse.NOT_SERVING)
            )
            writes.add(task)
            task.add_done_callback(writes.discard)

    store.add_health_listener(follow_store)
    return RunningServer(server, port, servicer, health, store, cfg)


async def serve(
    address: str,
    store: Store,
    config: ServerConfig | None = None,
    *,
    on_started: Callable[[RunningServer], None] | None = None,
) -> None:
    """Run the service until SIGTERM or SIGINT, then shut down gracefully."""
    running = await create_server(address, store, config)
    stop = asyncio.Event()
    received: list[str] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    log.debug("serving on port %d", running.port)  # the CLI prints its own "serving on" line
    if on_started is not None:  # only now: a signal right after it shuts down gracefully
        on_started(running)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await running.stop(why=f"received {received[0]}" if received else "cancelled")
