"""Prometheus metrics of the bridge and the service, with ``prometheus_client``.

Each process makes its own :class:`prometheus_client.CollectorRegistry` (the
objects here register in the one they are given, never in the library's
global registry), so tests and embedders can run several bridges or servers in
one process. :func:`serve_metrics` exposes a registry over HTTP for
``--metrics-address``.

Metric names start with ``shellinfo_bridge_`` and ``shellinfo_service_``.
Labels carry the cluster (its source name) and outcomes; never run ids, so the
number of series stays small.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shellinfo_grpc.errors import ConfigurationError, RunRejected

__all__ = ["BridgeMetrics", "ServiceMetrics", "parse_metrics_address", "serve_metrics"]

#: Poll outcomes (label ``outcome`` of ``shellinfo_bridge_polls_total``).
POLL_OUTCOMES: Final = ("ok", "unavailable", "auth", "protocol", "error")


class _SinceLastSuccess(Collector):
    """``shellinfo_bridge_seconds_since_last_successful_poll``, computed when scraped."""

    def __init__(self, last: dict[str, float], lock: threading.Lock, clock: Callable[[], float]) -> None:
        self._last = last
        self._lock = lock
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "shellinfo_bridge_seconds_since_last_successful_poll",
            "Seconds since the last successful poll of each cluster (since the bridge started, before the first).",
            labels=["cluster"],
        )
        now = self._clock()
        with self._lock:
            items = list(self._last.items())
        for cluster, when in items:
            family.add_metric([cluster], max(now - when, 0.0))
        yield family


class BridgeMetrics:
    """The bridge's metrics, registered in ``registry`` (a new one when not given).

    * ``shellinfo_bridge_polls_total{cluster, outcome}``: polls by outcome
      (``ok``, ``unavailable``: 429/5xx/timeouts through every retry,
      ``auth``, ``protocol``: an answer not as the API describes, ``error``);
    * ``shellinfo_bridge_seconds_since_last_successful_poll{cluster}`` and
      ``shellinfo_bridge_last_successful_poll_timestamp_seconds{cluster}``;
    * ``shellinfo_bridge_http_responses_total{cluster, code}``: HTTP statuses
      received, with ``timeout`` and ``connection`` for requests without one;
    * ``shellinfo_bridge_runs_published_total{cluster}``: updates the service
      accepted (``changed`` or not);
    * ``shellinfo_bridge_updates_refused_total{cluster, reason}``;
    * ``shellinfo_bridge_pending_updates``: changes waiting for the service;
    * ``shellinfo_bridge_runs_dropped_total{cluster}``: changes not queued
      because the pending queue was full (they are picked up by a later poll).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.polls = Counter(
            "shellinfo_bridge_polls", "Polls of a cluster, by outcome.", ["cluster", "outcome"], registry=r
        )
        self.last_success = Gauge(
            "shellinfo_bridge_last_successful_poll_timestamp_seconds",
            "Unix time of the last successful poll of each cluster.",
            ["cluster"],
            registry=r,
        )
        self.http_responses = Counter(
            "shellinfo_bridge_http_responses",
            "HTTP answers from clusters by status code (timeout, connection: none received).",
            ["cluster", "code"],
            registry=r,
        )
        self.published = Counter(
            "shellinfo_bridge_runs_published", "Run updates the service acknowledged.", ["cluster"], registry=r
        )
        self.refused = Counter(
            "shellinfo_bridge_updates_refused",
            "Run updates the service refused, by reason.",
            ["cluster", "reason"],
            registry=r,
        )
        self.pending = Gauge("shellinfo_bridge_pending_updates", "Run updates waiting for the service.", registry=r)
        self.dropped = Counter(
            "shellinfo_bridge_runs_dropped",
            "Run changes not queued because the pending queue was full (a later poll finds them again).",
            ["cluster"],
            registry=r,
        )
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        r.register(_SinceLastSuccess(self._last, self._lock, clock))

    def cluster_started(self, cluster: str) -> None:
        """Start the seconds-since-success clock of a cluster (before its first success)."""
        with self._lock:
            self._last.setdefault(cluster, self._clock())

    def poll_done(self, cluster: str, outcome: str) -> None:
        """Count one poll; an ``ok`` one resets the cluster's seconds-since-success."""
        self.polls.labels(cluster, outcome).inc()
        if outcome == "ok":
            now = self._clock()
            self.last_success.labels(cluster).set(now)
            with self._lock:
                self._last[cluster] = now


class ServiceMetrics:
    """The service's metrics, for ``shellinfo serve --metrics-address`` (give it as ``ServerConfig.metrics``).

    * ``shellinfo_service_publishes_total{outcome}``: updates published, by
      outcome: ``changed``, ``unchanged``, ``refused`` (a rule or the size
      limit), ``error`` (the store could not be reached);
    * ``shellinfo_service_watchers``: open watches;
    * ``shellinfo_service_head_revision``: the newest revision;
    * ``shellinfo_service_store_commit_seconds``: how long the store took to
      apply and make durable one batch of publishes.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.publishes = Counter("shellinfo_service_publishes", "Publishes by outcome.", ["outcome"], registry=r)
        self.watchers = Gauge("shellinfo_service_watchers", "Open watches.", registry=r)
        self.head_revision = Gauge("shellinfo_service_head_revision", "The newest revision.", registry=r)
        self.commit_seconds = Histogram(
            "shellinfo_service_store_commit_seconds",
            "Store commit latency in seconds.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )

    def follow(self, head_revision: Callable[[], int], watchers: Callable[[], int]) -> None:
        """Read the head revision and the number of watches from these functions whenever scraped."""
        self.head_revision.set_function(lambda: float(head_revision()))
        self.watchers.set_function(lambda: float(watchers()))

    def committed(self, outcomes: Sequence[object], seconds: float) -> None:
        """Count the outcomes of one store batch (changed, unchanged or refused) and time its commit."""
        self.commit_seconds.observe(seconds)
        counts = {"changed": 0, "unchanged": 0, "refused": 0}
        for outcome in outcomes:
            if isinstance(outcome, RunRejected):
                counts["refused"] += 1
            else:
                counts["changed" if getattr(outcome, "changed", False) else "unchanged"] += 1
        for outcome_name, count in counts.items():
            if count:
                self.publishes.labels(outcome_name).inc(count)

    def refused(self, count: int = 1) -> None:
        """Count publishes refused before they reached the store (too large)."""
        self.publishes.labels("refused").inc(count)

    def failed(self, count: int) -> None:
        """Count publishes that failed because the store could not be reached."""
        self.publishes.labels("error").inc(count)


def parse_metrics_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:9100`` for IPv6); a clear error names what is wrong."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ConfigurationError(f"--metrics-address: expected HOST:PORT, got {address!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"--metrics-address: port {port} is out of range")
    return host.strip("[]"), port


def serve_metrics(address: str, registry: CollectorRegistry) -> tuple[Callable[[], None], int]:
    """Serve ``registry`` at ``http://ADDRESS/metrics`` in a thread; return (stop, bound port)."""
    host, port = parse_metrics_address(address)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigurationError(f"--metrics-address: cannot listen on {address}: {exc.strerror}") from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return stop, int(server.server_address[1])
