"""Clients of the run-update service: :class:`RunUpdateClient` (blocking) and
:class:`AsyncRunUpdateClient` (asyncio), with the same methods.

Both accept a run as a ``ProtectionShellInfo`` message or as a REST dictionary
(converted with :func:`shellinfo_grpc.rest.from_rest`, whose
:class:`~shellinfo_grpc.errors.RestDecodeError` propagates), and status or run
type filters as enum numbers or REST spellings (``"kSuccess"``). Callers never
see a raw gRPC error: every failed call raises a
:class:`~shellinfo_grpc.errors.ServiceError` carrying the status code name,
the google.rpc ``ErrorInfo`` reason and metadata and the ``BadRequest`` field
violations (REST keys), with the gRPC error as ``__cause__``:

* a refused publish is :class:`~shellinfo_grpc.errors.RunRejected`
  (``INVALID_ARGUMENT`` or ``FAILED_PRECONDITION``);
* a watch that starts before the retained history is
  :class:`~shellinfo_grpc.errors.HistoryExpired` (``OUT_OF_RANGE``);
* a watch (or its resume) beyond the newest revision + 1, which means the
  store was replaced or reset, is
  :class:`~shellinfo_grpc.errors.RevisionInFuture` (``OUT_OF_RANGE``): the
  watch ends with it rather than silently starting over;
* anything else, ``NOT_FOUND``, ``UNAUTHENTICATED`` and ``UNAVAILABLE``
  included, is a plain :class:`~shellinfo_grpc.errors.ServiceError`.

:meth:`RunUpdateClient.watch` resumes by itself: when the stream ends with
``UNAVAILABLE`` (server restart or shutdown, lost connection) or
``RESOURCE_EXHAUSTED`` with reason ``WATCHER_TOO_SLOW`` (the watcher fell too
far behind), it reconnects with
exponential backoff and jitter (:class:`ReconnectPolicy`) and continues from the
revision after the last one it delivered, so the caller sees every update once
and in revision order across any number of disconnects.

Connection settings: TLS when ``tls=True`` or any ``tls_*`` file is given
(mutual TLS with ``tls_cert`` and ``tls_key``); a bearer token goes out as
``authorization: Bearer <token>`` metadata on every call (over plaintext only
to a loopback address, unless ``allow_insecure_token=True``). Keepalive pings go
out every 30 s, also while idle (the server accepts pings 10 s apart or
slower), and messages up to 16 MiB are received.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeAlias, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from shellinfo_grpc._gen.shellinfo.v1 import protection_job_pb2 as _job_pb
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as _pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2_grpc as _svc_grpc
from shellinfo_grpc._status import (
    KEY_HEAD_REVISION,
    KEY_LAST_REVISION,
    KEY_OLDEST_REVISION,
    KEY_REQUESTED_REVISION,
    REASON_HISTORY_EXPIRED,
    REASON_REVISION_IN_FUTURE,
    REASON_WATCHER_TOO_SLOW,
    REFUSED_CODES,
    code_name,
    details,
)
from shellinfo_grpc.errors import (
    ConfigurationError,
    HistoryExpired,
    RestDecodeError,
    RevisionInFuture,
    RunRejected,
    ServiceError,
)
from shellinfo_grpc.rest import from_rest, rest_names
from shellinfo_grpc.run_instance import job_from_rest

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncRunUpdateClient",
    "AsyncRunWatch",
    "EnumInput",
    "JobInput",
    "PublishItem",
    "PublishResult",
    "ReconnectPolicy",
    "RunInput",
    "RunUpdateClient",
    "RunWatch",
    "WatchEvent",
    "is_loopback",
]

#: A run as the client methods accept it: a message or a REST dictionary.
RunInput: TypeAlias = _pb.ProtectionShellInfo | Mapping[str, Any]
#: A job as the client methods accept it: a ``ProtectionJob`` message, or a
#: dictionary with its REST keys (``jobId``, ``jobName``, ``jobUid``; a whole
#: ``ProtectionRunInstance`` will do), or ``None`` for no job.
JobInput: TypeAlias = _job_pb.ProtectionJob | Mapping[str, Any] | None
#: One item of :meth:`RunUpdateClient.publish_many`: a run, ``(source, run)``
#: or ``(source, run, job)``.
PublishItem: TypeAlias = RunInput | tuple[str, RunInput] | tuple[str, RunInput, JobInput]
#: An enum filter value: the enum number, or its REST spelling (``"kSuccess"``).
EnumInput: TypeAlias = int | str

_Metadata: TypeAlias = tuple[tuple[str, str], ...]
# What a client's watch() and list() return: its kind of watch, and of iterator.
_Watch = TypeVar("_Watch")
_Pages = TypeVar("_Pages")
_R = TypeVar("_R")  # the response of a unary call
_Options: TypeAlias = Sequence[tuple[str, Any]]

#: Seconds a unary call (publish, get, one page of list) may take by default.
DEFAULT_TIMEOUT: Final = 30.0

#: Channel options set on purpose; ``options=`` given to a client override them by name.
_DEFAULT_OPTIONS: Final[tuple[tuple[str, Any], ...]] = (
    # Ping every 30 s, also without calls in flight (a watcher waiting for the
    # next update is such a client), and give up on a silent peer after 10 s.
    # The server accepts pings 10 s apart or slower.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 << 20),
    # Retry a lost connection at least every 5 s (gRPC's default backs off to
    # 120 s), so a watch resumes soon after the server is back.
    ("grpc.max_reconnect_backoff_ms", 5_000),
)

_STATUS_BY_REST: Final = {name: number for number, name in rest_names(_pb.RunStatus.DESCRIPTOR).items()}
_RUN_TYPE_BY_REST: Final = {name: number for number, name in rest_names(_pb.RunType.DESCRIPTOR).items()}


# --- public value types ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishResult:
    """An accepted publish: the run's revision now, and whether this publish changed it.

    ``changed`` is ``False`` when the published state was identical to the
    run's current one; ``revision`` is then the existing revision.
    """

    revision: int
    changed: bool


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One thing a watch delivers: an update, or the end of the initial snapshot.

    For an update, ``update`` is the ``RunUpdate`` message and ``revision`` its
    revision. The one event with ``snapshot_complete`` set has no update; its
    ``revision`` is the revision the snapshot is consistent with: applying the
    updates delivered before it, in order, gives the latest state of every
    matching run as of that revision.
    """

    update: _svc.RunUpdate | None
    revision: int
    snapshot_complete: bool = False


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How a watch reconnects after ``UNAVAILABLE`` or a too-slow ``RESOURCE_EXHAUSTED``.

    The n-th consecutive reconnect waits a random time between half of and the
    full ``min(initial_delay * 2 ** (n - 1), max_delay)`` seconds. Any response
    from the server ends a series of failures. ``max_attempts`` bounds the
    reconnects of one series and ``timeout`` its duration in seconds (``None``:
    no bound, the watch waits for the server forever); past either, the watch
    raises the last error. ``max_attempts=0`` turns resuming off.
    """

    initial_delay: float = 0.05
    max_delay: float = 5.0
    max_attempts: int | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ConfigurationError("reconnect delays must not be negative")
        if self.max_attempts is not None and self.max_attempts < 0:
            raise ConfigurationError("max_attempts must not be negative")
        if self.timeout is not None and self.timeout < 0:
            raise ConfigurationError("the reconnect timeout must not be negative")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the ``attempt``-th consecutive reconnect (1-based), with jitter."""
        ceiling = min(self.initial_delay * 2.0 ** min(max(attempt - 1, 0), 62), self.max_delay)
        # Jitter spreads the reconnects of many watchers after a restart; it
        # needs no cryptographic randomness.
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311


# --- conversions shared by both clients ----------------------------------------------


def _to_run(run: RunInput) -> _pb.ProtectionShellInfo:
    if isinstance(run, _pb.ProtectionShellInfo):
        return run
    return from_rest(run)


def _to_job(job: JobInput) -> _job_pb.ProtectionJob | None:
    if job is None or isinstance(job, _job_pb.ProtectionJob):
        return job
    if not isinstance(job, Mapping):
        raise RestDecodeError("job", f"expected a ProtectionJob or a JSON object, got {type(job).__name__}")
    return job_from_rest(job)


def _publish_request(run: RunInput, source: str, job: JobInput) -> _svc.PublishRunRequest:
    return _svc.PublishRunRequest(source=source, run=_to_run(run), job=_to_job(job))


def _published(response: _svc.PublishRunResponse) -> PublishResult:
    return PublishResult(response.revision, response.changed)


def _publish_item(item: PublishItem, default_source: str) -> _svc.PublishRunsRequest:
    if isinstance(item, tuple):
        if len(item) not in (2, 3) or not isinstance(item[0], str):
            raise RestDecodeError(None, "a publish item is a run, a (source, run) pair or a (source, run, job) triple")
        job = _to_job(item[2]) if len(item) == 3 else None
        return _svc.PublishRunsRequest(source=item[0], run=_to_run(item[1]), job=job)
    return _svc.PublishRunsRequest(source=default_source, run=_to_run(item))


def _values(values: Any) -> tuple[Any, ...]:
    """A filter argument as a tuple; one bare value (``"c1"``, ``7``) counts as one."""
    if isinstance(values, str | bytes | int):
        return (values,)
    return tuple(values)


def _enum_numbers(values: Iterable[EnumInput] | EnumInput, table: Mapping[str, int], key: str) -> list[int]:
    numbers: list[int] = []
    for value in _values(values):
        if isinstance(value, str):
            if value not in table:
                raise RestDecodeError(key, f"unknown value {value!r}; expected one of {', '.join(table)}")
            numbers.append(table[value])
        elif isinstance(value, int) and not isinstance(value, bool):
            numbers.append(value)
        else:
            raise RestDecodeError(key, f"expected a REST spelling or an enum number, got {value!r}")
    return numbers


def _run_filter(
    sources: Iterable[str] | str,
    job_run_ids: Iterable[int] | int,
    statuses: Iterable[EnumInput] | EnumInput,
    run_types: Iterable[EnumInput] | EnumInput,
    job_ids: Iterable[int] | int = (),
) -> _svc.RunFilter:
    names = _values(sources)
    for name in names:
        if not isinstance(name, str):
            raise RestDecodeError("source", f"expected a string, got {name!r}")
    ids = _values(job_run_ids)
    jobs = _values(job_ids)
    for key, numbers in (("jobRunId", ids), ("jobId", jobs)):
        for number in numbers:
            if not isinstance(number, int) or isinstance(number, bool) or not -(2**63) <= number < 2**63:
                raise RestDecodeError(key, f"expected an integer within int64, got {number!r}")
    return _svc.RunFilter(
        sources=names,
        job_run_ids=ids,
        job_ids=jobs,
        statuses=[_pb.RunStatus.ValueType(n) for n in _enum_numbers(statuses, _STATUS_BY_REST, "status")],
        run_types=[_pb.RunType.ValueType(n) for n in _enum_numbers(run_types, _RUN_TYPE_BY_REST, "runType")],
    )


#: The OUT_OF_RANGE reasons of a watch start, their error class and the metadata key of the revision it names.
_REVISION_ERRORS: Final[dict[str, tuple[type[HistoryExpired] | type[RevisionInFuture], str]]] = {
    REASON_HISTORY_EXPIRED: (HistoryExpired, KEY_OLDEST_REVISION),
    REASON_REVISION_IN_FUTURE: (RevisionInFuture, KEY_HEAD_REVISION),
}


def _service_error(exc: grpc.RpcError, *, publish: bool = False, start_revision: int = 0) -> ServiceError:
    """Turn a gRPC error into the error hierarchy, decoding its google.rpc details.

    ``publish`` says the call was a publish, where a refusal is
    :class:`RunRejected`; ``start_revision`` is the watch's, for
    :class:`HistoryExpired` when the server does not say it.
    """
    code_of = getattr(exc, "code", None)
    status_code = code_of() if callable(code_of) else None
    code = status_code.name if isinstance(status_code, grpc.StatusCode) else "UNKNOWN"
    details_of = getattr(exc, "details", None)
    message = (details_of() if callable(details_of) else None) or ""
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    try:
        # Every RpcError gRPC raises is also the Call it ended.
        status = rpc_status.from_call(cast(grpc.Call, exc))
    except (AttributeError, TypeError, ValueError, DecodeError):
        status = None  # no readable details: the code and message say it all
    if status is not None:
        message = status.message or message
        found = details(status)
        reason, metadata, violations = found.reason, found.metadata or {}, list(found.violations)
    if code == "OUT_OF_RANGE" and reason in _REVISION_ERRORS:
        error_class, key = _REVISION_ERRORS[reason]
        try:
            revision = int(metadata[key])
            requested = int(metadata.get(KEY_REQUESTED_REVISION, start_revision))
        except (KeyError, ValueError):
            pass  # malformed metadata: fall back to a plain ServiceError
        else:
            return error_class(requested, revision)
    if publish and code in REFUSED_CODES:
        return RunRejected(code, reason, message, violations, metadata)
    return ServiceError(code, reason, message, violations, metadata)


def _ack_result(ack: _svc.PublishRunsResponse, expected: int) -> PublishResult | ServiceError:
    if ack.index != expected:
        raise ServiceError("INTERNAL", "", f"the server acknowledged update {ack.index} where {expected} was due")
    if ack.HasField("error"):
        error = ack.error
        return RunRejected(
            code_name(error.code),
            error.reason,
            error.message,
            [(v.field, v.description) for v in error.field_violations],
        )
    return PublishResult(ack.revision, ack.changed)


def _cancel(call: Any) -> None:
    """Cancel a call (a no-op once it ended); ``cancel`` is untyped in grpc-stubs."""
    call.cancel()


class _RequestFeed:
    """The requests of a PublishRuns stream, made lazily from the caller's items, and their acknowledgements.

    gRPC consumes the requests on its own (a thread, or a task); an error in
    the caller's items (a bad REST dict, say) must not vanish there. So the
    feed ends the request stream at the bad item and keeps the error, which
    the caller gets after the acknowledgements of every item before it.
    """

    def __init__(self, items: Iterable[PublishItem] | AsyncIterable[PublishItem], source: str) -> None:
        self._items = items
        self._source = source
        self.sent = 0
        self.acknowledged = 0
        self.failure: Exception | None = None

    def _request(self, item: PublishItem) -> _svc.PublishRunsRequest:
        request = _publish_item(item, self._source)
        self.sent += 1
        return request

    def requests(self) -> Iterator[_svc.PublishRunsRequest]:
        """The requests, for the blocking client."""
        try:
            if not isinstance(self._items, Iterable):
                raise TypeError("the blocking client publishes from an iterable, not an async iterable")
            for item in self._items:
                yield self._request(item)
        except Exception as exc:  # kept for the caller; see the class docstring
            self.failure = exc

    async def async_requests(self) -> AsyncIterator[_svc.PublishRunsRequest]:
        """The requests, for the asyncio client (items may be an async iterable)."""
        try:
            if isinstance(self._items, AsyncIterable):
                async for item in self._items:
                    yield self._request(item)
            else:
                for item in self._items:
                    yield self._request(item)
        except Exception as exc:  # kept for the caller; see the class docstring
            self.failure = exc

    def result(self, ack: _svc.PublishRunsResponse) -> PublishResult | ServiceError:
        """What the acknowledgement of the next item says."""
        result = _ack_result(ack, self.acknowledged)
        self.acknowledged += 1
        return result

    @contextlib.contextmanager
    def acknowledging(self, call: Any) -> Iterator[None]:
        """Around reading the acknowledgements of ``call``: gRPC errors become
        ServiceErrors, the call ends with the block, and at its end every item
        sent must have been acknowledged (and an error in the items is raised)."""
        try:
            yield
        except grpc.RpcError as exc:
            raise _service_error(exc, publish=True) from exc
        finally:
            _cancel(call)
        if self.failure is not None:
            raise self.failure
        if self.acknowledged != self.sent:
            raise ServiceError("INTERNAL", "", f"the server acknowledged {self.acknowledged} of {self.sent} updates")


# --- connection settings ---------------------------------------------------------------


def _read_pem(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"TLS: cannot read the {what} {path}: {exc.strerror}") from None


def is_loopback(address: str) -> bool:
    """Whether a gRPC target names only this machine (loopback, localhost, Unix socket).

    A target may list several addresses (``ipv4:127.0.0.1:1,127.0.0.1:2``): every
    one of them must be loopback, since the channel may fail over to any.
    """
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    hosts = address
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        if hosts.startswith(scheme):
            hosts = hosts[len(scheme) :]
            break
    return all(_is_loopback_host(host) for host in hosts.split(","))


def _is_loopback_host(host: str) -> bool:
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class _ChannelPlan:
    """What both clients need to open a channel and make calls."""

    target: str
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    options: tuple[tuple[str, Any], ...]
    metadata: _Metadata | None  # sent with every call (plaintext token)


def _plan_channel(
    address: str,
    *,
    token: str | None,
    tls: bool,
    tls_ca: Path | str | None,
    tls_cert: Path | str | None,
    tls_key: Path | str | None,
    options: _Options,
    allow_insecure_token: bool,
) -> _ChannelPlan:
    merged = dict(_DEFAULT_OPTIONS)
    merged.update(options)
    if token is not None and not token.strip():
        raise ConfigurationError("the bearer token is empty")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigurationError("TLS: give tls_cert and tls_key together (mutual TLS), or neither")
    if not (tls or tls_ca is not None or tls_cert is not None):
        metadata: _Metadata | None = None
        if token is not None:
            if not (allow_insecure_token or is_loopback(address)):
                raise ConfigurationError(
                    f"a bearer token would cross the network to {address} in plaintext; "
                    "use TLS (tls_ca=...), a loopback address, or allow_insecure_token=True"
                )
            metadata = (("authorization", f"Bearer {token.strip()}"),)
        return _ChannelPlan(address, None, tuple(merged.items()), metadata)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_pem(tls_ca, "CA certificate") if tls_ca is not None else None,
        private_key=_read_pem(tls_key, "client key") if tls_key is not None else None,
        certificate_chain=_read_pem(tls_cert, "client certificate") if tls_cert is not None else None,
    )
    if token is not None:
        # Call credentials add "authorization: Bearer <token>" to every call,
        # and gRPC sends them only over a secure channel.
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token.strip()))
    return _ChannelPlan(address, credentials, tuple(merged.items()), None)


# --- watching: the resume logic shared by both clients ------------------------------------

_SNAPSHOT: Final = "snapshot"  # the server is sending the initial snapshot
_RESUMED: Final = "resumed"  # the snapshot broke off; history from after its last update replaces the rest
_STREAM: Final = "stream"  # history or live updates


class _WatchCursor:
    """Where a watch is, what to ask for on reconnect, and when to give up.

    ``position`` is the revision up to which the caller has been handed every
    matching update (``None``: unknown yet, for a watch "from now" that has not
    heard from the server). It advances per update as the caller takes them,
    and to each response's ``revision`` once the caller has taken the whole
    response, so progress responses move it while idle.

    A snapshot that breaks off is not restarted: its updates come in revision
    order, so the history after the last one delivered completes it. The
    snapshot-complete event then comes with the first response that carries no
    updates (the end of the catch-up, or progress): the server sends one only
    once it has sent everything up to a revision at or past the head it had
    when the snapshot was taken.
    """

    def __init__(
        self,
        flt: _svc.RunFilter,
        start_revision: int,
        include_snapshot: bool,
        progress_interval_ms: int,
        policy: ReconnectPolicy,
    ) -> None:
        self._filter = flt
        self._start = start_revision
        self._progress = progress_interval_ms
        self._policy = policy
        self.phase = _SNAPSHOT if include_snapshot else _STREAM
        self.position: int | None = start_revision - 1 if start_revision > 0 and not include_snapshot else None
        self.failures = 0
        self._failing_since = 0.0
        self.reconnects = 0
        self.last_error: ServiceError | None = None

    @property
    def resume_revision(self) -> int | None:
        """The ``start_revision`` that continues right after what was delivered."""
        return None if self.position is None else self.position + 1

    def request(self) -> _svc.WatchRunsRequest:
        """The request for the next connection."""
        if self.phase == _SNAPSHOT:
            return _svc.WatchRunsRequest(
                filter=self._filter,
                start_revision=self._start,
                include_snapshot=True,
                progress_interval_ms=self._progress,
            )
        start = self._start if self.position is None else self.position + 1
        return _svc.WatchRunsRequest(filter=self._filter, start_revision=start, progress_interval_ms=self._progress)

    def events(self, response: _svc.WatchRunsResponse) -> Iterator[WatchEvent]:
        """The events of one response; the position moves as the caller takes them."""
        self.failures = 0
        updates = response.updates
        if self.phase == _SNAPSHOT:
            for update in updates:
                if self.position is None or update.revision > self.position:
                    self.position = update.revision
                    yield WatchEvent(update, update.revision)
            if response.snapshot_complete:
                self.phase = _STREAM
                self.position = max(self.position or 0, response.revision)
                yield WatchEvent(None, response.revision, snapshot_complete=True)
            return
        last = len(updates) - 1
        for index, update in enumerate(updates):
            if self.position is not None and update.revision <= self.position:
                continue  # delivered already
            # With the last update of a response, the caller has all of it.
            self.position = max(update.revision, response.revision) if index == last else update.revision
            yield WatchEvent(update, update.revision)
        if self.position is None or response.revision > self.position:
            self.position = response.revision
        if self.phase == _RESUMED and not updates:
            self.phase = _STREAM
            yield WatchEvent(None, self.position, snapshot_complete=True)

    def handed(self, response: _svc.WatchRunsResponse) -> Iterator[tuple[WatchEvent, tuple[int | None, str]]]:
        """The events of one response, each with the cursor state before it."""
        before = (self.position, self.phase)
        for event in self.events(response):
            yield event, before
            before = (self.position, self.phase)

    def take_back(self, before: tuple[int | None, str]) -> None:
        """Undo the position an event moved, when the caller never got it."""
        self.position, self.phase = before

    def retry_delay(self, error: ServiceError) -> float | None:
        """Seconds to wait before resuming after ``error``, or ``None`` to raise it.

        A watch resumes after ``UNAVAILABLE``, and after the
        ``RESOURCE_EXHAUSTED`` that the server sends a watcher that fell
        behind (reason ``WATCHER_TOO_SLOW``); not after other
        ``RESOURCE_EXHAUSTED`` errors, such as a message over the size limit,
        which would only come back.
        """
        too_slow = error.code == "RESOURCE_EXHAUSTED" and error.reason == REASON_WATCHER_TOO_SLOW
        if self.phase == _RESUMED and isinstance(error, HistoryExpired):
            # A snapshot that broke off could not be completed from the history
            # (trimmed): take a new snapshot. Its updates at or below the
            # position were delivered already and are skipped.
            self.phase = _SNAPSHOT
            self.reconnects += 1
            self.last_error = error
            return 0.0
        if not (error.code == "UNAVAILABLE" or too_slow):
            return None
        now = time.monotonic()
        if self.failures == 0:
            self._failing_since = now
        self.failures += 1
        policy = self._policy
        if policy.max_attempts is not None and self.failures > policy.max_attempts:
            return None
        if policy.timeout is not None and now - self._failing_since > policy.timeout:
            return None
        if self.phase == _SNAPSHOT and self.position is not None:
            self.phase = _RESUMED
        if self.position is None and self.phase == _STREAM:
            # A watch from now that the server ended (shutdown, too slow)
            # before its first response: the server says where it was.
            last = error.metadata.get(KEY_LAST_REVISION, "")
            if last.isdigit():
                self.position = int(last)
        self.reconnects += 1
        self.last_error = error
        return policy.delay(self.failures)


_ENDED: Final = "the server ended the watch"


class _WatchBase:
    """What the blocking and the asyncio watch share: the cursor and its read-outs."""

    def __init__(self, cursor: _WatchCursor) -> None:
        self._cursor = cursor

    @property
    def resume_revision(self) -> int | None:
        """The ``start_revision`` of a new watch that continues right after what this one delivered.

        ``None`` until the server has said where a watch "from now" starts.
        """
        return self._cursor.resume_revision

    @property
    def reconnects(self) -> int:
        """How many times this watch has reconnected."""
        return self._cursor.reconnects

    @property
    def last_error(self) -> ServiceError | None:
        """The error that caused the latest reconnect, if any."""
        return self._cursor.last_error

    @property
    def connected(self) -> bool:
        """Whether the server has answered since the connection was last lost (False while reconnecting).

        After a reconnect the server answers at once (the catch-up ends with a
        response of its own), so this turns True as soon as the watch resumes,
        before any new update arrives.
        """
        return self._cursor.failures == 0


class RunWatch(_WatchBase):
    """A running watch of the blocking client: iterate it for :class:`WatchEvent` objects.

    The first call is made when the watch is created; reconnects happen as the
    caller iterates. :meth:`close` (also from another thread) or leaving the
    ``with`` block cancels the call; iteration then ends.
    """

    def __init__(
        self,
        stub: _svc_grpc.RunUpdateServiceStub,
        cursor: _WatchCursor,
        metadata: _Metadata | None,
    ) -> None:
        super().__init__(cursor)
        self._stub = stub
        self._metadata = metadata
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._call: grpc.CallIterator[_svc.WatchRunsResponse] | None = None
        self._open()
        self._events = self._run()

    def _open(self) -> grpc.CallIterator[_svc.WatchRunsResponse]:
        self._request: _svc.WatchRunsRequest = self._cursor.request()
        call = self._stub.WatchRuns(self._request, metadata=self._metadata)
        with self._lock:
            self._call = call
        if self._closed.is_set():
            _cancel(call)
        return call

    def _run(self) -> Iterator[WatchEvent]:
        cursor = self._cursor
        call = self._call
        try:
            while not self._closed.is_set():
                if call is None:
                    call = self._open()
                cause: grpc.RpcError | None = None
                try:
                    for response in call:
                        for event, before in cursor.handed(response):
                            if self._closed.is_set():
                                cursor.take_back(before)  # closed: this event is not handed over
                                return
                            yield event
                    error = ServiceError("UNAVAILABLE", "", _ENDED)
                except grpc.RpcError as exc:
                    if self._closed.is_set():
                        return
                    cause = exc
                    error = _service_error(exc, start_revision=self._request.start_revision)
                _cancel(call)
                call = None
                delay = cursor.retry_delay(error)
                if delay is None:
                    raise error from cause
                if self._closed.wait(delay):
                    return
        finally:
            if call is not None:
                _cancel(call)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> WatchEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop the watch: cancel the call; iteration ends. Safe from any thread, idempotent."""
        self._closed.set()
        with self._lock:
            call = self._call
        if call is not None:
            _cancel(call)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncRunWatch(_WatchBase):
    """A running watch of the asyncio client: ``async for`` it for :class:`WatchEvent` objects.

    The first call is made when the watch is created (inside the event loop);
    reconnects happen as the caller iterates. :meth:`close` (also from another
    task) or leaving the ``async with`` block cancels the call; iteration then
    ends.
    """

    def __init__(
        self,
        stub: _svc_grpc.RunUpdateServiceAsyncStub,
        cursor: _WatchCursor,
        metadata: _Metadata | None,
    ) -> None:
        super().__init__(cursor)
        self._stub = stub
        self._metadata = metadata
        self._closed = False
        self._wakeup = asyncio.Event()
        self._call: grpc.aio.UnaryStreamCall[_svc.WatchRunsRequest, _svc.WatchRunsResponse] | None = None
        self._open()
        self._events = self._run()

    def _open(self) -> grpc.aio.UnaryStreamCall[_svc.WatchRunsRequest, _svc.WatchRunsResponse]:
        self._request: _svc.WatchRunsRequest = self._cursor.request()
        call = self._stub.WatchRuns(self._request, metadata=self._metadata)
        self._call = call
        return call

    async def _run(self) -> AsyncGenerator[WatchEvent, None]:
        cursor = self._cursor
        call = self._call
        try:
            while not self._closed:
                if call is None:
                    call = self._open()
                cause: grpc.RpcError | None = None
                try:
                    async for response in call:
                        for event, before in cursor.handed(response):
                            if self._closed:
                                cursor.take_back(before)  # closed: this event is not handed over
                                return
                            yield event
                    error = ServiceError("UNAVAILABLE", "", _ENDED)
                except grpc.RpcError as exc:
                    if self._closed:
                        return
                    cause = exc
                    error = _service_error(exc, start_revision=self._request.start_revision)
                except asyncio.CancelledError:
                    # close() cancels the call, and grpc.aio reports a locally
                    # cancelled call as CancelledError: that one ends the watch.
                    # A cancellation of the task itself propagates.
                    task = asyncio.current_task()
                    if self._closed and call.cancelled() and (task is None or not task.cancelling()):
                        return
                    raise
                _cancel(call)
                call = None
                delay = cursor.retry_delay(error)
                if delay is None:
                    raise error from cause
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
        finally:
            if call is not None:
                _cancel(call)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchEvent:
        return await anext(self._events)

    def close(self) -> None:
        """Stop the watch: cancel the call; iteration ends. Safe from another task, idempotent."""
        self._closed = True
        self._wakeup.set()
        if self._call is not None:
            _cancel(self._call)

    async def aclose(self) -> None:
        """Stop the watch and release it now (see :meth:`close`)."""
        self.close()
        with contextlib.suppress(RuntimeError):  # still running in another task: it ends by itself
            await self._events.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


# --- the clients -------------------------------------------------------------------------


class _ClientBase(Generic[_Watch, _Pages]):
    """What both clients share: settings, the channel plan, and the methods that make no call.

    ``list`` and ``watch`` are written once here; each client opens its own
    kind of channel (:meth:`_connect`), pages (:meth:`_pages`) and watch
    (:meth:`_open_watch`).
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca: Path | str | None = None,
        tls_cert: Path | str | None = None,
        tls_key: Path | str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        options: _Options = (),
        reconnect: ReconnectPolicy | None = None,
        allow_insecure_token: bool = False,
    ) -> None:
        self._plan = _plan_channel(
            address,
            token=token,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            options=options,
            allow_insecure_token=allow_insecure_token,
        )
        self._timeout = timeout
        self._metadata = self._plan.metadata
        self._reconnect = reconnect or ReconnectPolicy()
        self.address = address
        self._connect(self._plan)

    def _connect(self, plan: _ChannelPlan) -> None:
        """Open the channel and its stub."""
        raise NotImplementedError  # pragma: no cover

    def _pages(self, flt: _svc.RunFilter, page_size: int) -> _Pages:
        """The updates of every page of ListRuns, fetched as they are needed."""
        raise NotImplementedError  # pragma: no cover

    def _open_watch(self, cursor: _WatchCursor) -> _Watch:
        """Start a watch from ``cursor``."""
        raise NotImplementedError  # pragma: no cover

    def list(
        self,
        *,
        sources: Iterable[str] | str = (),
        job_run_ids: Iterable[int] | int = (),
        statuses: Iterable[EnumInput] | EnumInput = (),
        run_types: Iterable[EnumInput] | EnumInput = (),
        job_ids: Iterable[int] | int = (),
        page_size: int = 100,
    ) -> _Pages:
        """The latest update of every matching run, ordered by (source, jobRunId).

        Within one filter the values are alternatives; filters combine with
        AND; an empty one matches everything. ``job_ids`` keeps runs whose job
        (``RunUpdate.job.job_id``, REST ``jobId``) is one of them; a run
        published without a job id matches none. Pages of ``page_size`` are
        fetched as the iteration needs them (the asyncio client returns an
        async iterator).
        """
        return self._pages(_run_filter(sources, job_run_ids, statuses, run_types, job_ids), page_size)

    def watch(
        self,
        *,
        sources: Iterable[str] | str = (),
        job_run_ids: Iterable[int] | int = (),
        statuses: Iterable[EnumInput] | EnumInput = (),
        run_types: Iterable[EnumInput] | EnumInput = (),
        job_ids: Iterable[int] | int = (),
        start_revision: int = 0,
        include_snapshot: bool = False,
        progress_interval_ms: int = 0,
        reconnect: ReconnectPolicy | None = None,
    ) -> _Watch:
        """Watch matching updates; resume by itself after disconnects.

        The filters are those of :meth:`list`. ``start_revision`` is the first revision to deliver, inclusive (0:
        from now). ``include_snapshot`` delivers the latest state of every
        matching run first, then a ``snapshot_complete`` event. Every update
        is delivered once, in revision order, across reconnects; a start
        older than the retained history raises
        :class:`~shellinfo_grpc.errors.HistoryExpired` (also on a reconnect),
        never skips; a resume against a server whose store was replaced or
        reset (its newest revision below where the watch left off) raises
        :class:`~shellinfo_grpc.errors.RevisionInFuture`, never restarts.
        ``progress_interval_ms`` is how often the server reports progress
        while idle (0: every 5 s); it moves the resume point past updates the
        filter skips. A server that cannot be reached when the
        watch starts is retried like a lost connection, as ``reconnect`` (or
        the client's policy) says. Caveat: a watch from now whose connection
        is lost before the server's first response (an update or progress)
        starts from now again.

        The blocking client returns a :class:`RunWatch` to iterate, the
        asyncio client an :class:`AsyncRunWatch` to ``async for``.
        """
        flt = _run_filter(sources, job_run_ids, statuses, run_types, job_ids)
        policy = reconnect or self._reconnect
        return self._open_watch(_WatchCursor(flt, start_revision, include_snapshot, progress_interval_ms, policy))


class RunUpdateClient(_ClientBase[RunWatch, Iterator[_svc.RunUpdate]]):
    """A blocking client of ``shellinfo.v1.RunUpdateService``.

    ``address`` is a gRPC target (``HOST:PORT``, ``unix:PATH``, ...).
    ``token`` is a bearer token sent with every call. TLS is used when ``tls``
    is true or any ``tls_*`` file is given: ``tls_ca`` is the PEM bundle that
    signs the server's certificate (the system's roots when absent);
    ``tls_cert`` and ``tls_key`` are the client certificate and key for mutual
    TLS. Files are read at once; one that cannot be read is a
    :class:`~shellinfo_grpc.errors.ConfigurationError` naming it. Over
    plaintext a token is sent only to a loopback address (``127.0.0.1``,
    ``::1``, ``localhost``, a Unix socket), where nobody can read it on the
    way; ``allow_insecure_token=True`` lifts that.

    ``timeout`` bounds each unary call (publish, get, one page of list) in
    seconds; streams (``publish_many``, ``watch``) have none. ``options`` are
    gRPC channel options that override the defaults by name; ``reconnect`` is
    the default :class:`ReconnectPolicy` of watches.

    Use it as a context manager or call :meth:`close`. It is safe to share
    between threads.
    """

    def _connect(self, plan: _ChannelPlan) -> None:
        if plan.credentials is None:
            self._channel = grpc.insecure_channel(plan.target, options=plan.options)
        else:
            self._channel = grpc.secure_channel(plan.target, plan.credentials, options=plan.options)
        self._stub = _svc_grpc.RunUpdateServiceStub(self._channel)

    def _unary(self, method: Callable[..., _R], request: Message, *, publish: bool = False) -> _R:
        """Make a unary call; a gRPC error becomes a ServiceError."""
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _service_error(exc, publish=publish) from exc

    def publish(self, run: RunInput, *, source: str = "", job: JobInput = None) -> PublishResult:
        """Publish one update of a run; raise :class:`RunRejected` when it is refused.

        ``job`` is the protection job the run belongs to; without one the run
        keeps the job it was published with before.
        """
        request = _publish_request(run, source, job)
        return _published(self._unary(self._stub.PublishRun, request, publish=True))

    def publish_many(self, runs: Iterable[PublishItem], *, source: str = "") -> Iterator[PublishResult | ServiceError]:
        """Publish many updates over one stream; yield one result per item, in order.

        An item is a run (published under ``source``), a ``(source, run)``
        pair or a ``(source, run, job)`` triple. A refused item yields its :class:`RunRejected` error instead of
        a result, and the stream goes on. An item that is not a valid run (a
        bad REST dict) ends the stream: the items before it are acknowledged
        first, then its :class:`~shellinfo_grpc.errors.RestDecodeError` is
        raised. Lazy: nothing is sent until the results are iterated; ``runs``
        is read on a gRPC thread as the stream goes. Stopping the iteration
        early cancels the stream; items sent but not acknowledged by then may
        or may not have been recorded.
        """
        feed = _RequestFeed(runs, source)
        call = self._stub.PublishRuns(feed.requests(), metadata=self._metadata)
        with feed.acknowledging(call):
            for ack in call:
                yield feed.result(ack)

    def get(self, job_run_id: int, *, source: str = "") -> _svc.RunUpdate:
        """The latest update of one run; a run that does not exist is a ServiceError ``NOT_FOUND``."""
        return self._unary(self._stub.GetRun, _svc.GetRunRequest(source=source, job_run_id=job_run_id)).update

    def _pages(self, flt: _svc.RunFilter, page_size: int) -> Iterator[_svc.RunUpdate]:
        token = ""
        while True:
            request = _svc.ListRunsRequest(filter=flt, page_size=page_size, page_token=token)
            response = self._unary(self._stub.ListRuns, request)
            yield from response.updates
            token = response.next_page_token
            if not token:
                return

    def _open_watch(self, cursor: _WatchCursor) -> RunWatch:
        return RunWatch(self._stub, cursor, self._metadata)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncRunUpdateClient(_ClientBase[AsyncRunWatch, AsyncIterator[_svc.RunUpdate]]):
    """The asyncio twin of :class:`RunUpdateClient`: same arguments, same methods.

    ``publish`` and ``get`` are coroutines; ``publish_many`` and ``list`` are
    async iterators; ``watch`` returns an :class:`AsyncRunWatch`. Create it
    inside the event loop that uses it; use it as an async context manager or
    await :meth:`close`.
    """

    def _connect(self, plan: _ChannelPlan) -> None:
        if plan.credentials is None:
            self._channel = grpc.aio.insecure_channel(plan.target, options=plan.options)
        else:
            self._channel = grpc.aio.secure_channel(plan.target, plan.credentials, options=plan.options)
        self._stub = _svc_grpc.RunUpdateServiceStub(self._channel)

    async def _unary(self, method: Callable[..., Awaitable[_R]], request: Message, *, publish: bool = False) -> _R:
        """Make a unary call; a gRPC error becomes a ServiceError."""
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _service_error(exc, publish=publish) from exc

    async def publish(self, run: RunInput, *, source: str = "", job: JobInput = None) -> PublishResult:
        """As :meth:`RunUpdateClient.publish`."""
        request = _publish_request(run, source, job)
        return _published(await self._unary(self._stub.PublishRun, request, publish=True))

    async def publish_many(
        self, runs: Iterable[PublishItem] | AsyncIterable[PublishItem], *, source: str = ""
    ) -> AsyncIterator[PublishResult | ServiceError]:
        """As :meth:`RunUpdateClient.publish_many`; ``runs`` may also be an async iterable."""
        feed = _RequestFeed(runs, source)
        call = self._stub.PublishRuns(feed.async_requests(), metadata=self._metadata)
        with feed.acknowledging(call):
            async for ack in call:
                yield feed.result(ack)

    async def get(self, job_run_id: int, *, source: str = "") -> _svc.RunUpdate:
        """As :meth:`RunUpdateClient.get`."""
        request = _svc.GetRunRequest(source=source, job_run_id=job_run_id)
        return (await self._unary(self._stub.GetRun, request)).update

    async def _pages(self, flt: _svc.RunFilter, page_size: int) -> AsyncIterator[_svc.RunUpdate]:
        token = ""
        while True:
            request = _svc.ListRunsRequest(filter=flt, page_size=page_size, page_token=token)
            response = await self._unary(self._stub.ListRuns, request)
            for update in response.updates:
                yield update
            token = response.next_page_token
            if not token:
                return

    def _open_watch(self, cursor: _WatchCursor) -> AsyncRunWatch:
        return AsyncRunWatch(self._stub, cursor, self._metadata)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
