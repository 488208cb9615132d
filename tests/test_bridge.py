"""The bridge end to end: a FakeCluster (real HTTP server) -> Bridge -> the real service -> a watcher.

Every test starts the real grpc.aio service on 127.0.0.1 port 0 and one or more
:class:`~shellinfo_grpc.testing.FakeCluster` servers, drives the bridge through
one fault of issue 9 (token expiry, 401, 429 with Retry-After, 500, slow
answers, truncated answers, unknown statuses and keys, the service down, a
refused update, a failing cluster beside a healthy one, TLS), and then reads
the service's whole history with a watcher: each run's states must arrive
exactly once and in order, equal (as REST) to the states the cluster showed
at the polls.

The fake cluster's clock only moves when a test advances it, and the bridge's
windows are computed from that clock, so what each poll sees is known.

Each state compared carries the run's job too (``"job"``: its ``jobId``,
``jobName`` and ``jobUid`` as REST), so every test also checks that each update
reaches the watcher with the job the cluster showed beside the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from certs import make_pki
from harness import aio_test_within
from hypothesis import given, settings
from hypothesis import strategies as st

from shellinfo_grpc import REST_KEYS, RestDecodeError, to_rest
from shellinfo_grpc._cluster_api import Credentials, RetryPolicy
from shellinfo_grpc._jsonvalue import encode as canonical_json
from shellinfo_grpc.bridge import Bridge, ClusterConfig, ServiceConfig
from shellinfo_grpc.client import AsyncRunUpdateClient
from shellinfo_grpc.errors import ConfigurationError
from shellinfo_grpc.metrics import BridgeMetrics
from shellinfo_grpc.run_instance import job_from_rest, job_to_rest
from shellinfo_grpc.server import RunningServer, create_server
from shellinfo_grpc.stores._registry import open_store
from shellinfo_grpc.testing import FakeCluster

DEADLINE = 40.0
pytestmark = pytest.mark.timeout(90)

START = 1_700_000_000.0
FAST = RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.05)
ADMIN = Credentials(username="admin", password="admin")


aio_test = aio_test_within(DEADLINE)


@contextlib.asynccontextmanager
async def service(port: int = 0, store_url: str = "memory://") -> AsyncIterator[RunningServer]:
    running = await create_server(f"127.0.0.1:{port}", open_store(store_url))
    try:
        yield running
    finally:
        await running.stop(grace=0)


def config(cluster: FakeCluster, **overrides: Any) -> ClusterConfig:
    options: dict[str, Any] = {"source": "c1", "retry": FAST, "interval": 0.05, "read_timeout": 5.0}
    options.update(overrides)
    credentials = options.pop("credentials", ADMIN)
    return ClusterConfig(cluster.url, credentials, **options)


async def history(port: int) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Every update the service holds, per run, in revision order, as REST."""
    async with AsyncRunUpdateClient(f"127.0.0.1:{port}") as client:
        head = max([u.revision async for u in client.list()], default=0)
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        if head == 0:
            return runs
        revisions: list[int] = []
        async with client.watch(start_revision=1) as watch:
            async for event in watch:
                if event.update is not None:
                    update = event.update
                    revisions.append(update.revision)
                    state = to_rest(update.run)
                    if update.HasField("job"):
                        state["job"] = job_to_rest(update.job)
                    runs.setdefault((update.source, update.run.job_run_id), []).append(state)
                if event.revision >= head:
                    break
    assert revisions == sorted(revisions), "a watcher sees revisions in order"
    return runs


class Observer:
    """What the fake cluster showed at each poll, per run, without repeats: the expected history."""

    def __init__(self, cluster: FakeCluster, source: str = "c1") -> None:
        self.cluster = cluster
        self.source = source
        self.runs: list[int] = []
        self.expected: dict[tuple[str, int], list[dict[str, Any]]] = {}

    def add(self, run_id: int) -> int:
        self.runs.append(run_id)
        return run_id

    def look(self) -> None:
        for run_id in self.runs:
            state = self.cluster.shell_info(run_id)
            if state is None:
                continue
            state["job"] = self.cluster.job_of(run_id)
            seen = self.expected.setdefault((self.source, run_id), [])
            if not seen or seen[-1] != state:
                seen.append(state)


async def poll_steps(bridge: Bridge, observer: Observer, steps: int, seconds: float, **once: Any) -> list[bool]:
    """Poll, then advance the fake clock, ``steps`` times; return each poll's ``ok``."""
    results = []
    for _ in range(steps):
        observer.look()
        result = await bridge.run_once(**once)
        results.append(result.ok)
        observer.cluster.advance(seconds)
    return results


def runs_queries(cluster: FakeCluster) -> list[dict[str, str]]:
    return [dict(r.query) for r in cluster.requests if r.endpoint == "protectionRuns"]


def sample(metrics: BridgeMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def mixed_runs(cluster: FakeCluster, observer: Observer) -> None:
    """Two jobs; runs that succeed, fail, are canceled, pass a status and a key no version knows."""
    a = cluster.add_job("vm-daily")
    b = cluster.add_job("sql-logs")
    observer.add(cluster.add_run(a))
    observer.add(
        cluster.add_run(a, timeline=[("kAccepted", 0), ("kRunning", 120), ("kFailure", 240)], error="disk full")
    )
    observer.add(
        cluster.add_run(b, run_type="kLog", timeline=[("kRunning", 0), ("kCanceling", 60), ("kCanceled", 180)])
    )
    observer.add(
        cluster.add_run(
            b,
            start=START + 120,
            timeline=[("kAccepted", 0), ("kPaused", 60), ("kRunning", 180), ("kWarning", 300)],
            extra_keys={"timezone": "Europe/Berlin", "newCounter": 2**70},
        )
    )
    # A run that lasts five hours: windows must keep reaching back to its start.
    observer.add(
        cluster.add_run(a, start=START + 60, timeline=[("kAccepted", 0), ("kRunning", 30), ("kSuccess", 5 * 3600)])
    )


# --- every state, once, in order -------------------------------------------------------------


@aio_test
async def test_every_state_reaches_a_watcher_once_and_in_order() -> None:
    async with service() as running, FakeCluster(start_time=START) as cluster:
        observer = Observer(cluster)
        mixed_runs(cluster, observer)
        bridge_config = config(cluster, overlap=60.0)
        async with Bridge([bridge_config], ServiceConfig(f"127.0.0.1:{running.port}"), clock=cluster.time) as bridge:
            assert all(await poll_steps(bridge, observer, 8, 60.0))
            assert all(await poll_steps(bridge, observer, 6, 3600.0))
            assert all(await poll_steps(bridge, observer, 1, 0.0))  # every run is final now
        assert await history(running.port) == observer.expected
        assert all(len(states) >= 2 for states in observer.expected.values())
        queries = runs_queries(cluster)
        assert queries
        for query in queries:
            assert query["onlyReturnShellInfo"] == "true"
            assert query["excludeTasks"] == "true"
            assert query["numRuns"] == "1000"
            assert "endTimeUsecs" not in query
        # The first window looks back 24 hours; later ones reach back to the
        # five-hour run (queued at START + 60) until it is final, hours later.
        assert int(queries[0]["startTimeUsecs"]) == round((START - 24 * 3600) * 1e6)
        assert all(int(q["startTimeUsecs"]) <= round((START + 60) * 1e6) for q in queries[:13])
        assert int(queries[-1]["startTimeUsecs"]) > round((START + 60) * 1e6)


@aio_test
async def test_only_changed_runs_are_published_and_a_restarted_bridge_changes_nothing() -> None:
    async with service() as running, FakeCluster(start_time=START) as cluster:
        job = cluster.add_job("vm")
        first = cluster.add_run(job, timeline=[("kRunning", 0), ("kSuccess", 100)])
        cluster.add_run(job, timeline=[("kRunning", 0)])
        target = ServiceConfig(f"127.0.0.1:{running.port}")
        metrics = BridgeMetrics()
        async with Bridge([config(cluster)], target, clock=cluster.time, metrics=metrics) as bridge:
            await bridge.run_once()
            await bridge.run_once()  # nothing changed: nothing published
            assert sample(metrics, "shellinfo_bridge_runs_published_total", cluster="c1") == 2
            cluster.advance(200)
            await bridge.run_once()
            assert sample(metrics, "shellinfo_bridge_runs_published_total", cluster="c1") == 3
        before = await history(running.port)
        assert [s["status"] for s in before[("c1", first)]] == ["kRunning", "kSuccess"]
        async with Bridge([config(cluster)], target, clock=cluster.time) as again:
            assert (await again.run_once()).ok
        assert await history(running.port) == before  # re-read, re-published, no new revision


@aio_test
async def test_a_watch_by_job_sees_only_that_jobs_runs_each_with_its_job() -> None:
    async with service() as running, FakeCluster(start_time=START) as cluster:
        daily, hourly = cluster.add_job("vm-daily"), cluster.add_job("db-hourly")
        daily_runs = {cluster.add_run(daily, start=START - 60 * i) for i in range(3)}
        cluster.add_run(hourly, start=START - 30)
        target = ServiceConfig(f"127.0.0.1:{running.port}")
        async with AsyncRunUpdateClient(target.address) as client:
            watch = client.watch(job_ids=[daily], start_revision=1)
            async with Bridge([config(cluster)], target, clock=cluster.time) as bridge:
                assert (await bridge.run_once()).ok
                cluster.rename_job(daily, "vm-daily (renamed)")
                assert (await bridge.run_once()).ok  # the same runs, now with the new name: one change each
            seen: list[tuple[int, str]] = []
            async with watch:
                async for event in watch:
                    if event.update is not None:
                        assert event.update.job.job_id == daily
                        shown = job_to_rest(event.update.job)
                        assert shown["jobUid"] == cluster.job_of(event.update.run.job_run_id)["jobUid"]
                        seen.append((event.update.run.job_run_id, event.update.job.job_name))
                    if len(seen) == 2 * len(daily_runs):
                        break
            listed = [u async for u in client.list(job_ids=daily)]
        assert sorted(seen) == sorted(
            [(run, "vm-daily") for run in daily_runs] + [(run, "vm-daily (renamed)") for run in daily_runs]
        )
        assert {u.run.job_run_id for u in listed} == daily_runs
        assert {u.job.job_name for u in listed} == {"vm-daily (renamed)"}


# --- authentication -----------------------------------------------------------------------------


@aio_test
async def test_expired_tokens_mean_a_new_login_and_one_retry() -> None:
    async with service() as running, FakeCluster(start_time=START, token_lifetime=90) as cluster:
        observer = Observer(cluster)
        mixed_runs(cluster, observer)
        async with Bridge([config(cluster)], ServiceConfig(f"127.0.0.1:{running.port}"), clock=cluster.time) as bridge:
            assert all(await poll_steps(bridge, observer, 3, 60.0))  # the token expires during these
            cluster.expire_tokens()
            assert all(await poll_steps(bridge, observer, 2, 60.0))
            cluster.fail_next(401, endpoint="protectionRuns")  # "Token expired" though the token is fine
            assert all(await poll_steps(bridge, observer, 4, 60.0))
        assert await history(running.port) == observer.expected
        logins = [r for r in cluster.requests if r.endpoint == "accessTokens"]
        refused = [r for r in cluster.requests if r.endpoint == "protectionRuns" and r.status == 401]
        assert len(refused) >= 3
        assert len(logins) == len(refused) + 1  # one login at the start, one per 401
        assert all(r.username == "admin" and r.status == 201 for r in logins)


@aio_test
async def test_refused_credentials_fail_the_poll_without_a_login_loop(caplog: pytest.LogCaptureFixture) -> None:
    async with service() as running, FakeCluster(start_time=START) as cluster:
        cluster.add_run(cluster.add_job("vm"))
        metrics = BridgeMetrics()
        wrong = Credentials(username="admin", password="wrong")
        target = ServiceConfig(f"127.0.0.1:{running.port}")
        async with Bridge([config(cluster, credentials=wrong)], target, metrics=metrics) as bridge:
            result = await bridge.run_once()
        assert result.clusters == {"c1": False}
        assert result.published
        assert [r.endpoint for r in cluster.requests] == ["accessTokens"]
        assert sample(metrics, "shellinfo_bridge_polls_total", cluster="c1", outcome="auth") == 1
        assert "wrong" not in caplog.text  # no secret in the logs
        assert await history(running.port) == {}


@aio_test
async def test_api_key_and_access_cluster_id() -> None:
    async with service() as running, FakeCluster(start_time=START, api_keys=["k-123"]) as cluster:
        run = cluster.add_run(cluster.add_job("vm"))
        target = ServiceConfig(f"127.0.0.1:{running.port}")
        helios = Credentials(api_key="k-123", access_cluster_id=str(cluster.cluster_id))
        elsewhere = Credentials(api_key="k-123", access_cluster_id="42")
        async with Bridge(
            [config(cluster, credentials=helios), config(cluster, credentials=elsewhere, source="c2")],
            target,
            clock=cluster.time,
        ) as bridge:
            result = await bridge.run_once()
        assert result.clusters == {"c1": True, "c2": False}
        assert all(r.auth == "apiKey" for r in cluster.requests)
        assert {r.access_cluster_id for r in cluster.requests} == {str(cluster.cluster_id), "42"}
        assert list(await history(running.port)) == [("c1", run)]


# --- 429, 500, slow answers ------------------------------------------------------------------------


@aio_test
async def test_429_waits_at_least_retry_after() -> None:
    async with service() as running, FakeCluster(start_time=START) as cluster:
        observer = Observer(cluster)
        mixed_runs(cluster, observer)
        cluster.fail_next(429, endpoint="protectionRuns", retry_after=1)
        async with Bridge([config(cluster)], ServiceConfig(f"127.0.0.1:{running.port}"), clock=cluster.time) as bridge:
            assert all(await poll_steps(bridge, observer, 3, 120.0))
        queries = [r for r in cluster.requests if r.endpoint == "protectionRuns"]
        assert queries[0].status == 429
        assert queries[1].status == 200
        assert queries[1].wall_time - queries[0].wall_time >= 1.0
        assert await history(running.port) == observer.expected


@aio_test
async def test_500s_and_slow_answers_are_retried_with_backoff() -> None:
    async with service() as running, FakeCluster(start_time=START) as cluster:
        observer = Observer(cluster)
        mixed_runs(cluster, observer)
        metrics = BridgeMetrics()
        target = ServiceConfig(f"127.0.0.1:{running.port}")
        bridge_config = config(cluster, read_timeout=0.3)
        async with Bridge([bridge_config], target, clock=cluster.time, metrics=metrics) as bridge:
            cluster.fail_next(500, endpoint="protectionRuns", times=2)
            assert all(await poll_steps(bridge, observer, 1, 60.0))
            cluster.slow_next(1.5, endpoint="protectionRuns")
            assert all(await poll_steps(bridge, observer, 1, 60.0))
            # Past every retry: the poll fails, and the next one picks up what it missed.
            cluster.fail_next(503, endpoint="protectionRuns", times=3)
            cluster.advance(60)
            assert not (await bridge.run_once()).ok
            assert all(await poll_steps(bridge, observer, 6, 60.0))
        assert await history(running.port) == observer.expected
        assert sample(metrics, "shellinfo_bridge_http_responses_total", cluster="c1", code="500") == 2
        assert sample(metrics, "shellinfo_bridge_http_responses_total", cluster="c1", code="503") == 3
        assert sample(metrics, "shellinfo_bridge_http_responses_total", cluster="c1", code="timeout") == 1
        assert sample(metrics, "shellinfo_bridge_polls_total", cluster="c1", outcome="unavailable") == 1


# --- truncated answers ----------------------------------------------------------------------------------


@aio_test
async def test_full_answers_are_completed_per_job_with_growing_num_runs() -> None:
    async with service() as running, FakeCluster(start_time=START) as cluster:
        observer = Observer(cluster)
        big, small, tiny = cluster.add_job("big"), cluster.add_job("small"), cluster.add_job("tiny")
        for i in range(7):
            observer.add(cluster.add_run(big, start=START - 600 + i, timeline=[("kRunning", 0), ("kSuccess", 900)]))
        for i in range(2):
            observer.add(cluster.add_run(small, start=START - 300 + i))
        observer.add(cluster.add_run(tiny, start=START - 100))
        bridge_config = config(cluster, num_runs=3)
        async with Bridge([bridge_config], ServiceConfig(f"127.0.0.1:{running.port}"), clock=cluster.time) as bridge:
            assert all(await poll_steps(bridge, observer, 3, 600.0))
        assert await history(running.port) == observer.expected
        assert len(observer.expected) == 10
        per_job = [q for q in runs_queries(cluster) if "jobId" in q]
        big_sizes = [int(q["numRuns"]) for q in per_job if q["jobId"] == str(big)]
        assert big_sizes[:3] == [3, 6, 12]
        assert {q["jobId"] for q in per_job} == {str(big), str(small), str(tiny)}
        assert any(r.endpoint == "protectionJobs" for r in cluster.requests)


# --- unknown statuses and keys -----------------------------------------------------------------------


@aio_test
async def test_unknown_statuses_and_keys_are_kept_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shellinfo_grpc.bridge")
    async with service() as running, FakeCluster(start_time=START) as cluster:
        observer = Observer(cluster)
        job = cluster.add_job("vm")
        for _ in range(3):
            observer.add(
                cluster.add_run(
                    job, timeline=[("kQueuedV9", 0), ("kRunning", 60), ("kSuccess", 120)], extra_keys={"shard": [1, 2]}
                )
            )
        async with Bridge([config(cluster)], ServiceConfig(f"127.0.0.1:{running.port}"), clock=cluster.time) as bridge:
            assert all(await poll_steps(bridge, observer, 4, 60.0))
        assert await history(running.port) == observer.expected
        assert caplog.text.count("'kQueuedV9' is unknown") == 1
        assert caplog.text.count("'shard' is unknown") == 1


# --- the service down, refused updates -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@aio_test
async def test_changes_are_kept_while_the_service_is_down_and_published_in_order(tmp_path: Path) -> None:
    port = free_port()
    store_url = f"sqlite://{tmp_path / 'runs.sqlite3'}"
    async with FakeCluster(start_time=START) as cluster:
        observer = Observer(cluster)
        mixed_runs(cluster, observer)
        async with Bridge([config(cluster)], ServiceConfig(f"127.0.0.1:{port}"), clock=cluster.time) as bridge:
            # Nothing listens yet: polls go on, changes wait.
            results = await poll_steps(bridge, observer, 3, 60.0, flush_timeout=0.2)
            assert results == [False, False, False]
            waiting = bridge.pending
            assert waiting >= 5
            async with service(port, store_url):
                assert await bridge.flush(10)
                assert all(await poll_steps(bridge, observer, 2, 60.0))
            # Down again mid-way (a restart on the same store), then back.
            assert not any(await poll_steps(bridge, observer, 2, 60.0, flush_timeout=0.2))
            async with service(port, store_url) as running:
                assert await bridge.flush(10)
                assert all(await poll_steps(bridge, observer, 4, 3600.0))
                assert await history(running.port) == observer.expected


@aio_test
async def test_the_pending_queue_is_bounded_and_a_full_queue_loses_nothing(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    async with FakeCluster(start_time=START) as cluster:
        job = cluster.add_job("vm")
        for _ in range(10):
            cluster.add_run(job, timeline=[("kRunning", 0), ("kSuccess", 60)])
        metrics = BridgeMetrics()
        target = ServiceConfig(f"127.0.0.1:{port}")
        async with Bridge([config(cluster)], target, clock=cluster.time, max_pending=4, metrics=metrics) as bridge:
            await bridge.run_once(flush_timeout=0.1)
            assert bridge.pending == 4
            assert sample(metrics, "shellinfo_bridge_runs_dropped_total", cluster="c1") == 6
            await bridge.run_once(flush_timeout=0.1)  # still down: the same 6 wait again
            assert sample(metrics, "shellinfo_bridge_runs_dropped_total", cluster="c1") == 12
            assert caplog.text.count("pending queue full") == 1
            cluster.advance(120)
            async with service(port) as running:
                for _ in range(4):
                    await bridge.run_once()
                final = await history(running.port)
        assert len(final) == 10
        assert all(states[-1]["status"] == "kSuccess" for states in final.values())


@aio_test
async def test_a_refused_update_is_logged_once_and_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    async with service() as running, FakeCluster(start_time=START) as cluster:
        job = cluster.add_job("vm")
        run = cluster.add_run(job, timeline=[("kRunning", 0), ("kFailure", 120)], error="boom")
        other = cluster.add_run(job)
        async with AsyncRunUpdateClient(f"127.0.0.1:{running.port}") as client:
            # Someone else already recorded this run as final.
            await client.publish({"jobRunId": run, "status": "kSuccess", "startTimeUsecs": 1}, source="c1")
        metrics = BridgeMetrics()
        target = ServiceConfig(f"127.0.0.1:{running.port}")
        async with Bridge([config(cluster)], target, clock=cluster.time, metrics=metrics) as bridge:
            for _ in range(4):
                assert (await bridge.run_once()).ok
                cluster.advance(60)
        assert caplog.text.count(f"run={run} update refused") == 2  # kRunning, then kFailure: each once
        assert sample(metrics, "shellinfo_bridge_updates_refused_total", cluster="c1", reason="RUN_FINAL") == 2
        states = await history(running.port)
        assert [s["status"] for s in states[("c1", run)]] == ["kSuccess"]
        assert [s["status"] for s in states[("c1", other)]] == ["kAccepted", "kRunning"]


# --- many clusters, stopping -------------------------------------------------------------------------------


@aio_test
async def test_a_slow_cluster_never_delays_another_and_stop_is_clean() -> None:
    async with (
        service() as running,
        FakeCluster(start_time=START) as slow,
        FakeCluster(start_time=START) as healthy,
    ):
        slow.add_run(slow.add_job("vm"))
        healthy_run = healthy.add_run(healthy.add_job("vm"), timeline=[("kRunning", 0)])
        slow.slow_next(30.0, endpoint="protectionRuns", times=100)
        clusters = [
            config(slow, source="slow", read_timeout=20.0, interval=0.05),
            config(healthy, source="healthy", interval=0.05),
        ]
        async with Bridge(clusters, ServiceConfig(f"127.0.0.1:{running.port}"), clock=healthy.time) as bridge:
            task = asyncio.ensure_future(bridge.run())
            began = time.monotonic()
            while len(runs_queries(healthy)) < 5:
                await asyncio.sleep(0.05)
            assert time.monotonic() - began < 10
            bridge.stop()
            await asyncio.wait_for(task, 5)  # the slow request in flight does not hold the stop
        assert list(await history(running.port)) == [("healthy", healthy_run)]


@aio_test
async def test_cancelling_run_stops_at_once() -> None:
    async with service() as running, FakeCluster(start_time=START) as cluster:
        cluster.add_run(cluster.add_job("vm"))
        async with Bridge([config(cluster)], ServiceConfig(f"127.0.0.1:{running.port}"), clock=cluster.time) as bridge:
            task = asyncio.ensure_future(bridge.run())
            while (
                bridge.metrics.registry.get_sample_value(
                    "shellinfo_bridge_polls_total", {"cluster": "c1", "outcome": "ok"}
                )
                is None
            ):
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)


# --- TLS ----------------------------------------------------------------------------------------------------


@aio_test
async def test_tls_is_verified_unless_explicitly_skipped(tmp_path: Path) -> None:
    import ssl

    pki = make_pki(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    async with service() as running, FakeCluster(start_time=START, ssl_context=context) as cluster:
        assert cluster.url.startswith("https://")
        run = cluster.add_run(cluster.add_job("vm"))
        clusters = [
            config(cluster, source="trusted", ca_file=pki.ca.cert),
            config(cluster, source="unknown-ca"),
            config(cluster, source="skipped", insecure_skip_verify=True),
            config(cluster, source="rogue", ca_file=pki.rogue_ca.cert),
        ]
        async with Bridge(clusters, ServiceConfig(f"127.0.0.1:{running.port}"), clock=cluster.time) as bridge:
            result = await bridge.run_once()
        assert result.clusters == {"trusted": True, "unknown-ca": False, "skipped": True, "rogue": False}
        assert set(await history(running.port)) == {("trusted", run), ("skipped", run)}


# --- configuration and the job keys: classes of bad input ------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    url=st.one_of(
        st.text(max_size=30).filter(lambda u: not u.startswith(("http://", "https://"))),
        st.sampled_from(["ftp://host", "https://", "https://host/path", "https://host?x=1", "https://host:99999"]),
    )
)
def test_bad_cluster_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError, match="cluster URL"):
        ClusterConfig(url, ADMIN)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"interval": 0}, "interval"),
        ({"lookback": -1}, "lookback"),
        ({"num_runs": 0}, "num_runs"),
        ({"read_timeout": 0}, "read_timeout"),
        ({"insecure_skip_verify": True, "ca_file": Path("ca.pem")}, "not both"),
    ],
)
def test_bad_cluster_options_name_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ClusterConfig("https://cluster.example", ADMIN, **options)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"username": "u"},
        {"username": "u", "password": "p", "api_key": "k"},
        {"api_key": " "},
        {"username": "u", "password": "p", "access_cluster_id": "1"},
    ],
)
def test_credentials_need_exactly_one_kind(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="credentials"):
        Credentials(**kwargs)


def test_secrets_stay_out_of_reprs() -> None:
    assert "hunter2" not in repr(Credentials(username="u", password="hunter2"))
    assert "k-secret" not in repr(Credentials(api_key="k-secret"))
    assert "s3cr3t" not in repr(ServiceConfig("127.0.0.1:1", token="s3cr3t"))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=5,
)


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(["jobId", "jobName", "jobUid", "jobUid.clusterId", "jobUid.id"]), value=_JSON)
def test_job_keys_of_a_wrong_type_name_the_key(key: str, value: Any) -> None:
    outer, _, inner = key.partition(".")
    data: dict[str, Any] = {outer: {inner: value}} if inner else {outer: value}
    valid = value is None or (
        (type(value) is int and -(2**63) <= value < 2**63)
        if key != "jobName" and key != "jobUid"
        else isinstance(value, str if key == "jobName" else dict)
    )
    if key == "jobUid" and isinstance(value, dict):
        valid = all(
            v is None or (type(v) is int and -(2**63) <= v < 2**63)
            for k, v in value.items()
            if k in ("clusterId", "clusterIncarnationId", "id")
        )
    if valid:
        job = job_from_rest(data)
        assert job is None or job_from_rest(job_to_rest(job)) == job
    else:
        with pytest.raises(RestDecodeError) as error:
            job_from_rest(data)
        assert error.value.field is not None
        assert error.value.field.startswith(outer)


# --- odd data from a cluster never fails a poll ------------------------------------------------------------

_ODD_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=25, deadline=None)
@given(
    key=st.sampled_from(
        ["jobRunId", "startTimeUsecs", "endTimeUsecs", "status", "runType", "error", "startTimeHhmm", "brandNew"]
    ),
    value=_ODD_VALUE,
)
def test_a_run_with_odd_values_never_fails_the_poll_nor_holds_up_the_others(key: str, value: Any) -> None:
    async def body() -> None:
        async with service() as running, FakeCluster(start_time=START) as cluster:
            job = cluster.add_job("vm")
            good = cluster.add_run(job, start=START - 10)
            odd = cluster.add_run(job, extra_keys={key: value})
            async with Bridge([config(cluster)], ServiceConfig(f"127.0.0.1:{running.port}"), clock=cluster.time) as b:
                assert (await b.run_once()).ok
                cluster.advance(60)
                assert (await b.run_once()).ok
            published = await history(running.port)
            assert [s["status"] for s in published[("c1", good)]] == ["kAccepted", "kRunning"]
            odd_state = cluster.shell_info(odd)
            assert odd_state is not None
            if ("c1", odd) in published:  # accepted by from_rest: published as the cluster sent it
                # (a known key's null means unset; an unknown key's null is kept)
                expected = {k: v for k, v in odd_state.items() if v is not None or k not in REST_KEYS}
                expected["job"] = cluster.job_of(odd)
                # Compared as canonical JSON (docs/contract.md): a double such as 6.570521757652651e16 is
                # written 65705217576526510 and reads back as that integer, the same JSON value.
                assert canonical_json(published[("c1", odd)][-1]) == canonical_json(expected)
            else:  # refused by from_rest, or by the service (an end before the start, say): skipped
                assert key != "brandNew"

    asyncio.run(asyncio.wait_for(body(), DEADLINE))
