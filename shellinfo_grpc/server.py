"""The run-update gRPC service (grpc.aio): publish, get, list and watch runs.

:func:`create_server` builds a ready-to-start server around a :class:`Store`;
:func:`serve` runs one until SIGTERM or SIGINT and shuts it down gracefully.
Both are what ``shellinfo serve`` uses.

Guarantees (README.md, "Guarantees", says the same for users):

* every accepted update has a revision, strictly increasing service-wide, and
  is acknowledged only once the store made it durable;
* a watcher receives matching updates once each, in revision order; a backlog
  is sent in batches, live updates at once;
* a watcher that falls more than ``max_watch_queue`` updates behind is ended
  with RESOURCE_EXHAUSTED and the last revision it was sent, so it resumes
  without blocking publishers or other watchers;
* on shutdown, health turns NOT_SERVING, watchers end with UNAVAILABLE and
  in-flight publishes finish.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn

import grpc
from google.protobuf import message_factory
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from shellinfo_grpc._fanout import Hub, batches, encode, serialize_response
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as _pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2_grpc as _svc_grpc
from shellinfo_grpc._status import (
    KEY_JOB_RUN_ID,
    KEY_SOURCE,
    REASON_INVALID_REQUEST,
    REASON_RUN_NOT_FOUND,
    REASON_RUN_TOO_LARGE,
    error_status,
    publish_error,
    status_proto,
)
from shellinfo_grpc.errors import ConfigurationError, RunRejected, ServiceError, StoreUnavailable
from shellinfo_grpc.stores import Store

__all__ = [
    "SERVICE_NAME",
    "RunUpdateServicer",
    "RunningServer",
    "ServerConfig",
    "TlsConfig",
    "create_server",
    "load_tokens",
    "method_handlers",
    "serve",
]

log = logging.getLogger("shellinfo_grpc.server")

_SERVICE: Final = _svc.DESCRIPTOR.services_by_name["RunUpdateService"]
SERVICE_NAME: Final = _SERVICE.full_name

#: Methods that need no bearer token: health checks, so that load balancers
#: and orchestrator probes work without credentials.
AUTH_EXEMPT: Final = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})

_MAX_PAGE: Final = 1000
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
    ``max_run_bytes``: the largest serialized run accepted, far below the 4 MiB
    a client with gRPC's default limits can receive, so that every accepted
    update can be read back and watched.
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


async def _abort(context: grpc.aio.ServicerContext[Any, Any], proto: status_pb2.Status) -> NoReturn:
    """End the call with ``proto``: its code, message and google.rpc details."""
    status = rpc_status.to_status(proto)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


def _invalid(field_name: str, description: str) -> status_pb2.Status:
    return status_proto(
        "INVALID_ARGUMENT",
        f"{field_name}: {description}",
        reason=REASON_INVALID_REQUEST,
        violations=[(field_name, description)],
    )


# --- page tokens --------------------------------------------------------------


def _filter_key(flt: _svc.RunFilter) -> str:
    return base64.urlsafe_b64encode(flt.SerializeToString(deterministic=True)).decode()


def _encode_page_token(last: _svc.RunUpdate, flt: _svc.RunFilter) -> str:
    raw = json.dumps([last.source, last.run.job_run_id, _filter_key(flt)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_page_token(token: str, flt: _svc.RunFilter) -> tuple[str, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        source, job_run_id, key = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError("not a token this service issued") from exc
    if not isinstance(source, str) or type(job_run_id) is not int or not isinstance(key, str):
        raise ValueError("not a token this service issued")
    if key != _filter_key(flt):
        raise ValueError("the filter differs from the one the token was issued for")
    return source, job_run_id


# --- the servicer ---------------------------------------------------------------


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

    def close_watchers(self) -> None:
        """End every watch with UNAVAILABLE (shutdown), and refuse new ones."""
        self._hub.close()

    async def _publish(
        self, items: Sequence[tuple[str, _pb.ProtectionShellInfo]], context: grpc.aio.ServicerContext[Any, Any]
    ) -> list[Any]:
        try:
            return await self._store.publish_batch(items)
        except StoreUnavailable as exc:
            await _abort(context, error_status(exc))

    def _check_size(self, run: _pb.ProtectionShellInfo) -> None:
        size = run.ByteSize()
        if size > self._config.max_run_bytes:
            raise RunRejected(
                "INVALID_ARGUMENT",
                REASON_RUN_TOO_LARGE,
                f"the run is {size} bytes serialized; the most this service accepts is {self._config.max_run_bytes}",
                [("run", f"{size} bytes is over the limit of {self._config.max_run_bytes}")],
            )

    async def PublishRun(
        self, request: _svc.PublishRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _svc.PublishRunResponse:
        """Record one update (see the proto for the rules)."""
        run = request.run  # unset: an empty run, which the store refuses (no jobRunId)
        try:
            self._check_size(run)
        except RunRejected as exc:
            await _abort(context, error_status(exc))
        (outcome,) = await self._publish([(request.source, run)], context)
        if isinstance(outcome, RunRejected):
            await _abort(context, error_status(outcome))
        return _svc.PublishRunResponse(revision=outcome.update.revision, changed=outcome.changed)

    async def PublishRuns(
        self,
        request_iterator: AsyncIterator[_svc.PublishRunsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[_svc.PublishRunsResponse]:
        """Record a stream of updates, acknowledging each in order.

        Requests are read ahead while earlier ones are being stored, and all
        that are waiting go to the store as one batch (one commit), which is
        what makes a busy agent's stream fast.
        """
        # Read-ahead is bounded by bytes (requests may be up to
        # max_receive_bytes each), not only by count.
        queue: asyncio.Queue[_svc.PublishRunsRequest | None] = asyncio.Queue(maxsize=1000)
        budget = max(4 * self._config.max_batch_bytes, self._config.max_receive_bytes)
        queued = 0
        room = asyncio.Event()
        room.set()

        async def read() -> None:
            nonlocal queued
            try:
                async for req in request_iterator:
                    await room.wait()
                    queued += req.ByteSize()
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
                queued -= sum(r.ByteSize() for r in requests)
                if queued < budget:
                    room.set()
                if not requests:
                    continue
                acks: list[_svc.PublishRunsResponse | None] = [None] * len(requests)
                items: list[tuple[str, _pb.ProtectionShellInfo]] = []
                positions: list[int] = []
                for i, req in enumerate(requests):
                    run = req.run
                    try:
                        self._check_size(run)
                    except RunRejected as exc:
                        acks[i] = _svc.PublishRunsResponse(index=index + i, error=publish_error(exc))
                        continue
                    items.append((req.source, run))
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
                    yield ack
            # The stream ended: if reading it failed (a request that does not
            # parse, say), the call fails too instead of ending with OK.
            await reader
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

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
            await _abort(context, _invalid("page_size", "must not be negative"))
        size = min(request.page_size or _DEFAULT_PAGE, _MAX_PAGE)
        after = None
        if request.page_token:
            try:
                after = _decode_page_token(request.page_token, request.filter)
            except ValueError as exc:
                await _abort(context, _invalid("page_token", str(exc)))
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
            await _abort(context, _invalid("start_revision", "must not be negative"))
        if request.include_snapshot and request.start_revision:
            await _abort(context, _invalid("include_snapshot", "a snapshot starts from now: leave start_revision 0"))
        if request.progress_interval_ms < 0:
            await _abort(context, _invalid("progress_interval_ms", "must not be negative"))
        progress = max(request.progress_interval_ms or _DEFAULT_PROGRESS_MS, _MIN_PROGRESS_MS) / 1000
        flt = request.filter if request.HasField("filter") else None
        stream = self._hub.watch(flt, request.start_revision, request.include_snapshot, progress)
        try:
            async for response in stream:
                yield response
        except ServiceError as exc:  # the store failed, the history is gone, shutdown, too slow
            await _abort(context, error_status(exc))


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
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    message = "a valid bearer token is required (metadata 'authorization: Bearer <token>')"

    async def deny(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
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


def method_handlers(servicer: RunUpdateServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The handler of every rpc of the service, read from the service descriptor.

    Each rpc of the proto is registered with its streaming kind and message
    types, so one added to the proto cannot be left out (it answers
    UNIMPLEMENTED until the servicer implements it). A handler may send
    pre-encoded bytes instead of a response message (WatchRuns does, see
    :mod:`shellinfo_grpc._fanout`).
    """
    handlers = {}
    for method in _SERVICE.methods:
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=message_factory.GetMessageClass(method.input_type).FromString,
            response_serializer=serialize_response,
        )
    return handlers


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

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, end watchers (UNAVAILABLE), let
        in-flight calls finish for ``grace`` seconds, then close the store."""
        await self.health.enter_graceful_shutdown()
        self.servicer.close_watchers()
        await self.server.stop(self.config.shutdown_grace if grace is None else grace)
        await self.store.close()


async def create_server(address: str, store: Store, config: ServerConfig | None = None) -> RunningServer:
    """Start the store and a server bound to ``address`` (``HOST:PORT``; port 0 picks one).

    Returns a started :class:`RunningServer`; its ``port`` is the bound port.
    """
    cfg = config or ServerConfig()
    credentials = cfg.tls.credentials() if cfg.tls is not None else None  # fail before opening the store
    await store.start()
    interceptors = [_BearerTokenInterceptor(cfg.tokens)] if cfg.tokens else []
    server = grpc.aio.server(options=cfg.grpc_options(), interceptors=interceptors)
    servicer = RunUpdateServicer(store, cfg)
    _add_service(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
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
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_started is not None:  # only now: a signal right after it shuts down gracefully
        on_started(running)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await running.stop()
