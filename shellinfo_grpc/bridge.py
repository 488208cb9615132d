"""The bridge: poll Cohesity clusters' REST API v1 and publish every run change to the service.

One :class:`Bridge` follows any number of clusters (:class:`ClusterConfig`),
each on a task of its own, so that a cluster that fails or answers slowly
never delays the others, and publishes to one run-update service over one
``PublishRuns`` stream with acknowledgements.

Per cluster, every poll:

1. asks ``GET protectionRuns`` with ``onlyReturnShellInfo=true``,
   ``excludeTasks=true``, ``startTimeUsecs`` and ``numRuns`` (never
   ``endTimeUsecs``, which drops runs in progress). The window starts, on the
   first poll, ``lookback`` seconds ago; later, at the earliest start of any
   run seen that is not final yet, or ``overlap`` seconds before the previous
   poll if that is earlier, never further back than ``lookback``. So a run is
   followed from kAccepted to its final status however long it runs;
2. when the answer holds ``numRuns`` runs it may be cut, so the bridge asks
   per job (``jobId=``) for every job it has seen or ``GET protectionJobs``
   lists, doubling ``numRuns`` for a job whose answer is full too, up to
   ``max_num_runs``;
3. compares each run (its ``ProtectionRunInstance`` element as received:
   shell info and job keys) with the one it last queued for that run, and
   queues only the changed ones, oldest start first. Only they go through
   :func:`~shellinfo_grpc.rest.from_rest`, leniently: a status or key a newer
   cluster adds is kept and logged once, never a reason to drop the run.

The pending queue is bounded (``max_pending``). While the service is down the
bridge keeps polling and queueing; a change that finds the queue full is not
recorded as queued, so a later poll finds it again. Queued changes are
published in order once the service is back; a change is taken off the queue
only when the service acknowledged it, so changes in flight when a stream
breaks are sent again (the service's idempotence makes that safe). A refused
update (the final-status rule, say) is logged once with its run and never
retried.

Logs are one line per event, with ``cluster=`` and ``run=``; never secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlsplit

from shellinfo_grpc._cluster_api import (
    ClusterClient,
    Credentials,
    RetryPolicy,
    ssl_context,
)
from shellinfo_grpc._gen.shellinfo.v1 import protection_job_pb2 as _job_pb
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as _pb
from shellinfo_grpc.client import AsyncRunUpdateClient, PublishResult, ReconnectPolicy
from shellinfo_grpc.errors import (
    ClusterAuthError,
    ClusterError,
    ClusterProtocolError,
    ClusterUnavailable,
    ConfigurationError,
    RestDecodeError,
    ServiceError,
)
from shellinfo_grpc.metrics import BridgeMetrics
from shellinfo_grpc.rest import from_rest
from shellinfo_grpc.rules import FINAL_STATUSES
from shellinfo_grpc.run_instance import job_from_rest

__all__ = [
    "Bridge",
    "ClusterConfig",
    "Credentials",
    "OnceResult",
    "RetryPolicy",
    "RunChange",
    "ServiceConfig",
]

log = logging.getLogger("shellinfo_grpc.bridge")

_USECS: Final = 1_000_000
#: REST spellings of the final statuses: a run in one of them changes no more.
_FINAL_SPELLINGS: Final = frozenset({"kCanceled", "kSuccess", "kFailure", "kWarning", "kMissed"})
#: The same as enum numbers (a cluster may send a status as its number).
_FINAL_NUMBERS: Final = frozenset(int(number) for number in FINAL_STATUSES)


@dataclass(frozen=True)
class ClusterConfig:
    """One cluster to bridge.

    ``url`` is its base URL (``https://host[:port]``; ``http://`` works, with
    a warning, for tests). ``source`` names the cluster in the service (the
    URL's host when not given). TLS certificates are verified against the
    system's roots, or ``ca_file``; ``insecure_skip_verify`` turns that off
    (with a warning). ``interval`` is the seconds between polls,
    ``lookback`` how far back (seconds) the first poll looks and any window
    reaches, ``overlap`` how far (seconds) a window reaches back before the
    previous poll, ``num_runs`` the ``numRuns`` of a query and
    ``max_num_runs`` the most a per-job query asks for.
    ``connect_timeout`` and ``read_timeout`` bound each request (seconds);
    ``retry`` is how one request is retried; ``max_backoff`` bounds the wait
    between failed polls (seconds).
    """

    url: str
    credentials: Credentials
    source: str | None = None
    ca_file: Path | None = None
    insecure_skip_verify: bool = False
    interval: float = 30.0
    lookback: float = 24 * 3600.0
    overlap: float = 600.0
    num_runs: int = 1000
    max_num_runs: int = 64_000
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_backoff: float = 300.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigurationError(f"cluster URL: expected https://HOST[:PORT], got {self.url!r}")
        if parts.path.strip("/") or parts.query or parts.fragment:
            raise ConfigurationError(f"cluster URL: give the base URL only (https://HOST[:PORT]), got {self.url!r}")
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise ConfigurationError(f"cluster URL: bad port in {self.url!r}") from None
        for name in ("interval", "lookback", "connect_timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name}: must be positive, got {getattr(self, name)!r}")
        if self.overlap < 0 or self.max_backoff < 0:
            raise ConfigurationError("overlap and max_backoff must not be negative")
        if not 1 <= self.num_runs <= self.max_num_runs:
            raise ConfigurationError(f"num_runs: expected 1..{self.max_num_runs}, got {self.num_runs}")
        if self.insecure_skip_verify and self.ca_file is not None:
            raise ConfigurationError("give a CA file or skip verification, not both")

    @property
    def name(self) -> str:
        """The source name: ``source``, or the URL's host."""
        return self.source if self.source is not None else urlsplit(self.url).hostname or self.url


@dataclass(frozen=True)
class ServiceConfig:
    """Where the run-update service is, as :class:`~shellinfo_grpc.client.AsyncRunUpdateClient` takes it."""

    address: str
    token: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_insecure_token: bool = False


@dataclass(frozen=True, slots=True)
class RunChange:
    """One change of a run to publish: its source, new state and job."""

    source: str
    run: _pb.ProtectionShellInfo
    job: _job_pb.ProtectionJob | None


@dataclass(frozen=True)
class OnceResult:
    """What :meth:`Bridge.run_once` did: each cluster's poll outcome, and whether all was published."""

    clusters: dict[str, bool]
    published: bool

    @property
    def ok(self) -> bool:
        """Every cluster polled and every change acknowledged."""
        return self.published and all(self.clusters.values())


# --- the pending queue and the publisher ------------------------------------------------


class _PendingQueue:
    """Changes waiting for the service, in order; the head ones may be in flight."""

    def __init__(self, limit: int, metrics: BridgeMetrics) -> None:
        self.items: deque[RunChange] = deque()
        self.limit = limit
        self.wakeup = asyncio.Event()
        self.emptied = asyncio.Event()
        self.emptied.set()
        self._metrics = metrics

    def offer(self, change: RunChange) -> bool:
        """Queue a change; ``False`` when the queue is full."""
        if len(self.items) >= self.limit:
            return False
        self.items.append(change)
        self.emptied.clear()
        self.wakeup.set()
        self._metrics.pending.set(len(self.items))
        return True

    def pop(self) -> RunChange:
        item = self.items.popleft()
        self._metrics.pending.set(len(self.items))
        if not self.items:
            self.emptied.set()
        return item


class _Publisher:
    """Publishes the pending queue over one ``PublishRuns`` stream, reconnecting as needed.

    Up to ``window`` changes are in flight; each leaves the queue when its
    acknowledgement arrives. A broken stream is reopened with backoff and the
    unacknowledged changes are sent again, in order.
    """

    def __init__(
        self, service: ServiceConfig, queue: _PendingQueue, metrics: BridgeMetrics, *, window: int = 256
    ) -> None:
        self._service = service
        self._queue = queue
        self._metrics = metrics
        self._window = window
        self._client: AsyncRunUpdateClient | None = None
        self._reconnect = ReconnectPolicy(initial_delay=0.1, max_delay=5.0)
        self._down = False
        self._stream_acks = 0

    def open_client(self) -> AsyncRunUpdateClient:
        if self._client is None:
            s = self._service
            self._client = AsyncRunUpdateClient(
                s.address,
                token=s.token,
                tls=s.tls,
                tls_ca=s.tls_ca,
                tls_cert=s.tls_cert,
                tls_key=s.tls_key,
                allow_insecure_token=s.allow_insecure_token,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def run(self) -> None:
        """Publish forever (until cancelled)."""
        failures = 0
        while True:
            while not self._queue.items:
                self._queue.wakeup.clear()
                await self._queue.wakeup.wait()
            self._stream_acks = 0
            try:
                await self._stream(self.open_client())
            except (ServiceError, _StreamBroken) as exc:
                failures = 1 if self._stream_acks else failures + 1
                if not self._down:
                    log.warning(
                        "service=%s publishing interrupted (%s); %d changes kept, retrying",
                        self._service.address,
                        exc,
                        len(self._queue.items),
                    )
                    self._down = True
                await asyncio.sleep(self._reconnect.delay(failures))

    async def _stream(self, client: AsyncRunUpdateClient) -> None:
        """Feed one ``publish_many`` stream from the queue until it breaks (it raises what broke it).

        The items are fed as changes are queued, at most ``window`` ahead of
        the acknowledgements; a change leaves the queue when its result
        arrives, so what was in flight when the stream broke is sent again.
        """
        queue = self._queue
        in_flight = 0
        progress = asyncio.Event()

        async def items() -> AsyncIterator[tuple[str, _pb.ProtectionShellInfo, _job_pb.ProtectionJob | None]]:
            nonlocal in_flight
            while True:
                while in_flight >= len(queue.items) or in_flight >= self._window:
                    queue.wakeup.clear()
                    progress.clear()
                    waiters = [asyncio.ensure_future(queue.wakeup.wait()), asyncio.ensure_future(progress.wait())]
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for waiter in waiters:
                            waiter.cancel()
                change = queue.items[in_flight]
                in_flight += 1
                yield change.source, change.run, change.job

        results = client.publish_many(items())
        try:
            async for result in results:
                change = queue.pop()
                in_flight -= 1
                self._stream_acks += 1
                if self._down:
                    log.info("service=%s publishing again", self._service.address)
                    self._down = False
                self._acknowledged(change, result)
                progress.set()
        finally:
            await results.aclose()  # type: ignore[attr-defined]
        raise _StreamBroken("the service ended the stream")

    def _acknowledged(self, change: RunChange, result: PublishResult | ServiceError) -> None:
        run_id = change.run.job_run_id
        if isinstance(result, ServiceError):
            self._metrics.refused.labels(change.source, result.reason or result.code).inc()
            log.warning(
                "cluster=%s run=%d update refused, not retried: %s %s: %s",
                change.source,
                run_id,
                result.code,
                result.reason,
                result.message,
            )
            return
        self._metrics.published.labels(change.source).inc()
        log.debug(
            "cluster=%s run=%d published revision=%d changed=%s",
            change.source,
            run_id,
            result.revision,
            result.changed,
        )


class _StreamBroken(Exception):
    """The PublishRuns stream ended; reopen it."""


# --- one cluster -----------------------------------------------------------------------------


class _LogOnce:
    """Log a message once per key, for things that would repeat on every poll."""

    def __init__(self, limit: int = 10_000) -> None:
        self._seen: set[Any] = set()
        self._limit = limit

    def __call__(self, key: Any, level: int, message: str, *args: Any) -> None:
        if key in self._seen:
            return
        if len(self._seen) < self._limit:
            self._seen.add(key)
        log.log(level, message, *args)


class _ClusterPoller:
    """The state the bridge keeps about one cluster, and its polls."""

    def __init__(
        self,
        config: ClusterConfig,
        queue: _PendingQueue,
        metrics: BridgeMetrics,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.name = config.name
        self._queue = queue
        self._metrics = metrics
        self._clock = clock
        self._client: ClusterClient | None = None
        # jobRunId -> the ProtectionRunInstance element last queued, as received
        self._queued: dict[int, dict[str, Any]] = {}
        self._starts: dict[int, int] = {}  # jobRunId -> start time, for pruning
        self._open: dict[int, int] = {}  # jobRunId -> start time of runs not final yet
        self._jobs: set[int] = set()
        self._previous_poll: float | None = None
        self.failures = 0
        self.retry_after: float | None = None
        self._log_once = _LogOnce()
        self._queue_full = False

    def _cluster_client(self) -> ClusterClient:
        if self._client is None:
            c = self.config
            if urlsplit(c.url).scheme == "http":
                log.warning("cluster=%s uses plain HTTP: credentials and runs cross the network unencrypted", self.name)
            if c.insecure_skip_verify:
                log.warning("cluster=%s TLS certificate verification is OFF (--insecure-skip-verify)", self.name)
            tls = ssl_context(ca_file=c.ca_file, insecure_skip_verify=c.insecure_skip_verify)
            counter = self._metrics.http_responses
            self._client = ClusterClient(
                c.url,
                c.credentials,
                tls=tls,
                connect_timeout=c.connect_timeout,
                read_timeout=c.read_timeout,
                retry=c.retry,
                on_status=lambda code: counter.labels(self.name, code).inc(),
                name=self.name,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def window_start(self, now: float) -> int:
        """The ``startTimeUsecs`` of the next poll (see the module docstring)."""
        floor = round((now - self.config.lookback) * _USECS)
        if self._previous_poll is None:
            return floor
        start = round((self._previous_poll - self.config.overlap) * _USECS)
        if self._open:
            start = min(start, *self._open.values())
        return max(start, floor)

    def next_delay(self) -> float:
        """Seconds until the next poll: the interval, or a growing backoff after failures."""
        interval = self.config.interval
        if not self.failures:
            return interval
        ceiling = min(interval * 2.0 ** min(self.failures - 1, 30), max(self.config.max_backoff, interval))
        delay = max(interval, random.uniform(ceiling / 2, ceiling))  # noqa: S311 - jitter only
        if self.retry_after is not None:
            delay = max(delay, self.retry_after)
        return delay

    async def poll(self) -> bool:
        """Poll once, queue the changes; return whether the poll succeeded."""
        now = self._clock()
        outcome = "error"
        try:
            start = self.window_start(now)
            elements, complete = await self._fetch(start)
            self._diff(elements, start, complete)
            self._previous_poll = now
            self.failures, self.retry_after = 0, None
            outcome = "ok"
            return True
        except ClusterUnavailable as exc:
            outcome, self.retry_after = "unavailable", exc.retry_after
            log.warning("cluster=%s poll failed: %s", self.name, exc.message)
        except ClusterAuthError as exc:
            outcome = "auth"
            log.error("cluster=%s poll failed: %s", self.name, exc.message)
        except ClusterProtocolError as exc:
            outcome = "protocol"
            log.error("cluster=%s poll failed: %s", self.name, exc.message)
        except ClusterError as exc:  # pragma: no cover - every kind is above
            log.error("cluster=%s poll failed: %s", self.name, exc.message)
        except ConfigurationError as exc:
            outcome = "error"
            log.error("cluster=%s cannot poll: %s", self.name, exc)
        finally:
            self._metrics.poll_done(self.name, outcome)
        self.failures += 1
        return False

    async def _fetch(self, start: int) -> tuple[list[dict[str, Any]], bool]:
        """The runs of the window; per job when the first answer may be cut. Also: whether complete."""
        client = self._cluster_client()
        limit = self.config.num_runs
        elements = await client.protection_runs(start_time_usecs=start, num_runs=limit)
        if len(elements) < limit:
            return elements, True
        jobs = set(self._jobs)
        jobs.update(e["jobId"] for e in elements if type(e.get("jobId")) is int)
        jobs.update(j["id"] for j in await client.protection_jobs() if type(j.get("id")) is int)
        self._log_once(
            ("truncated", limit), logging.INFO, "cluster=%s %d runs in one answer: asking per job", self.name, limit
        )
        complete = True
        by_run: dict[Any, dict[str, Any]] = {}
        for job_id in sorted(jobs):
            size = limit
            while True:
                part = await client.protection_runs(start_time_usecs=start, num_runs=size, job_id=job_id)
                if len(part) < size:
                    break
                if size >= self.config.max_num_runs:
                    complete = False
                    self._log_once(
                        ("cut", job_id),
                        logging.WARNING,
                        "cluster=%s job=%d has more than %d runs in the window; the oldest are not followed",
                        self.name,
                        job_id,
                        size,
                    )
                    break
                size = min(size * 2, self.config.max_num_runs)
            for element in part:
                info = element.get("protectionShellInfo")
                key = info.get("jobRunId") if isinstance(info, dict) else None
                by_run[key if type(key) is int else id(element)] = element
        return list(by_run.values()), complete

    def _diff(self, elements: list[dict[str, Any]], start: int, complete: bool) -> None:
        """Queue the runs that changed since last queued, oldest start first; track open runs.

        The hot path: a run whose element (shell info, job keys and all) is
        equal to the one last queued costs two lookups and one dict comparison,
        all in C; only the others are checked and converted.
        """
        changed: list[tuple[int, int, dict[str, Any], dict[str, Any]]] = []
        seen: set[int] = set()
        seen_add = seen.add
        queued_get = self._queued.get
        for element in elements:
            info = element.get("protectionShellInfo")
            run_id = info.get("jobRunId") if type(info) is dict else None
            if type(run_id) is int:
                seen_add(run_id)
                if queued_get(run_id) == element:
                    continue
            if type(info) is not dict:
                self._log_once(
                    "no-shell-info", logging.WARNING, "cluster=%s a run has no protectionShellInfo", self.name
                )
                continue
            started = info.get("startTimeUsecs")
            if type(run_id) is not int or type(started) is not int:
                self._log_once(
                    ("no-id", repr(run_id)),
                    logging.WARNING,
                    "cluster=%s a run without an integer jobRunId and startTimeUsecs is skipped: jobRunId=%r",
                    self.name,
                    run_id,
                )
                continue
            job_id = element.get("jobId")
            if type(job_id) is int:
                self._jobs.add(job_id)
            status = info.get("status")
            if (type(status) is str and status in _FINAL_SPELLINGS) or (
                type(status) is int and status in _FINAL_NUMBERS
            ):
                self._open.pop(run_id, None)
            else:
                self._open[run_id] = started
            changed.append((started, run_id, info, element))
        if complete and self._open:
            # A run not final that the window covers but the answer left out is gone (its job deleted).
            for run_id in [r for r, s in self._open.items() if s >= start and r not in seen]:
                del self._open[run_id]
        changed.sort(key=lambda item: (item[0], item[1]))
        for position, (started, run_id, info, element) in enumerate(changed):
            change = self._change(run_id, info, element)
            if change is None:
                continue
            if not self._queue.offer(change):
                self._metrics.dropped.labels(self.name).inc(len(changed) - position)
                if not self._queue_full:  # once per episode, not on every poll while the service is down
                    log.warning(
                        "cluster=%s pending queue full (%d): %d changes wait for a later poll",
                        self.name,
                        self._queue.limit,
                        len(changed) - position,
                    )
                    self._queue_full = True
                break
            self._queued[run_id] = element
            self._starts[run_id] = started
        else:
            self._queue_full = False
        self._prune(start)

    def _change(self, run_id: int, info: dict[str, Any], element: dict[str, Any]) -> RunChange | None:
        try:
            run = from_rest(info)
        except RestDecodeError as exc:
            self._log_once(
                ("bad", run_id, str(exc)), logging.WARNING, "cluster=%s run=%d skipped: %s", self.name, run_id, exc
            )
            return None
        if run.HasField("unrecognized"):
            self._note_unrecognized(run_id, run.unrecognized)
        try:
            job = job_from_rest(element)
        except RestDecodeError as exc:
            self._log_once(
                ("bad-job", str(exc)),
                logging.WARNING,
                "cluster=%s run=%d published without its job: %s",
                self.name,
                run_id,
                exc,
            )
            job = None
        return RunChange(self.name, run, job)

    def _note_unrecognized(self, run_id: int, unrecognized: _pb.UnrecognizedRest) -> None:
        for attr, key in (("status", "status"), ("run_type", "runType")):
            if unrecognized.HasField(attr):  # type: ignore[arg-type]
                value = getattr(unrecognized, attr)
                self._log_once(
                    (key, value),
                    logging.WARNING,
                    "cluster=%s run=%d %s %r is unknown to this version; kept as sent",
                    self.name,
                    run_id,
                    key,
                    value,
                )
        for extra in unrecognized.extra_keys:
            self._log_once(
                ("key", extra.key),
                logging.INFO,
                "cluster=%s run=%d key %r is unknown to this version; kept as sent",
                self.name,
                run_id,
                extra.key,
            )

    def _prune(self, start: int) -> None:
        """Forget final runs that started before the window: no poll will return them again."""
        if len(self._starts) <= len(self._open) * 2 + 1024:
            return
        for run_id in [r for r, s in self._starts.items() if s < start and r not in self._open]:
            del self._starts[run_id]
            self._queued.pop(run_id, None)


# --- the bridge --------------------------------------------------------------------------------


class Bridge:
    """Bridge ``clusters`` to the run-update service at ``service`` (see the module docstring).

    Use it as an async context manager, then either :meth:`run` (poll every
    cluster at its interval until :meth:`stop` or cancellation) or
    :meth:`run_once` (poll every cluster once and publish; callable again,
    with the state kept). ``max_pending`` bounds the changes kept while the
    service is down; ``clock`` gives the time in Unix seconds the windows are
    computed from; ``metrics`` receives the bridge's metrics.
    """

    def __init__(
        self,
        clusters: Sequence[ClusterConfig],
        service: ServiceConfig,
        *,
        metrics: BridgeMetrics | None = None,
        max_pending: int = 100_000,
        clock: Callable[[], float] = time.time,
        publish_window: int = 256,
    ) -> None:
        if not clusters:
            raise ConfigurationError("no cluster to bridge")
        names = [c.name for c in clusters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigurationError(f"two clusters have the source name {duplicates[0]!r}; give each its own source")
        if max_pending < 1:
            raise ConfigurationError("max_pending: at least 1")
        self.metrics = metrics if metrics is not None else BridgeMetrics()
        self._clusters = list(clusters)
        self._service = service
        self._max_pending = max_pending
        self._clock = clock
        self._window = publish_window
        self._stopping: asyncio.Event | None = None
        self._queue: _PendingQueue | None = None
        self._publisher: _Publisher | None = None
        self._publisher_task: asyncio.Task[None] | None = None
        self._pollers: list[_ClusterPoller] = []

    async def __aenter__(self) -> Self:
        self._stopping = asyncio.Event()
        self._queue = _PendingQueue(self._max_pending, self.metrics)
        self._publisher = _Publisher(self._service, self._queue, self.metrics, window=self._window)
        self._publisher.open_client()  # settings that cannot work fail here, not in the task
        self._pollers = [_ClusterPoller(c, self._queue, self.metrics, self._clock) for c in self._clusters]
        for poller in self._pollers:
            self.metrics.cluster_started(poller.name)
        self._publisher_task = asyncio.ensure_future(self._publisher.run())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop publishing and close every connection (changes not yet acknowledged are dropped)."""
        task, self._publisher_task = self._publisher_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for poller in self._pollers:
            await poller.close()
        if self._publisher is not None:
            await self._publisher.close()

    @property
    def pending(self) -> int:
        """Changes not yet acknowledged by the service."""
        return len(self._queue.items) if self._queue is not None else 0

    def _started(self) -> tuple[_PendingQueue, asyncio.Event]:
        if self._queue is None or self._stopping is None:
            raise RuntimeError("use the bridge as an async context manager (async with Bridge(...) as bridge)")
        return self._queue, self._stopping

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued change is acknowledged; ``False`` if ``timeout`` passed first."""
        queue, _ = self._started()
        try:
            await asyncio.wait_for(queue.emptied.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def run_once(self, *, flush_timeout: float | None = 30.0) -> OnceResult:
        """Poll every cluster once (concurrently), then wait until the changes are published."""
        self._started()
        results = await asyncio.gather(*(poller.poll() for poller in self._pollers))
        published = await self.flush(flush_timeout)
        if not published:
            log.error("service=%s %d changes not published in time", self._service.address, self.pending)
        return OnceResult({p.name: ok for p, ok in zip(self._pollers, results, strict=True)}, published)

    def stop(self) -> None:
        """Ask :meth:`run` to finish: no new polls; the changes in flight are published first."""
        _, stopping = self._started()
        stopping.set()

    async def run(self, *, drain_timeout: float = 5.0) -> None:
        """Poll every cluster at its interval until :meth:`stop` (or cancellation).

        After :meth:`stop`, waits up to ``drain_timeout`` seconds for the
        queued changes to be acknowledged, then returns.
        """
        _, stopping = self._started()
        tasks = [asyncio.ensure_future(self._follow(poller, stopping)) for poller in self._pollers]
        try:
            await stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if not await self.flush(drain_timeout):
            log.warning("service=%s stopping with %d changes not published", self._service.address, self.pending)

    async def _follow(self, poller: _ClusterPoller, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await poller.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), poller.next_delay())
