"""shellinfo_grpc.metrics: the bridge's and the service's metrics, served over HTTP by prometheus_client."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shellinfo_grpc.client import AsyncRunUpdateClient
from shellinfo_grpc.errors import ConfigurationError, RunRejected
from shellinfo_grpc.metrics import BridgeMetrics, ServiceMetrics, parse_metrics_address, serve_metrics
from shellinfo_grpc.server import ServerConfig, create_server
from shellinfo_grpc.stores.memory import MemoryStore

pytestmark = pytest.mark.timeout(30)


def test_bridge_metrics_are_served_and_seconds_since_success_follow_the_clock() -> None:
    now = [1000.0]
    metrics = BridgeMetrics(clock=lambda: now[0])
    metrics.cluster_started("c1")
    metrics.poll_done("c1", "unavailable")
    metrics.http_responses.labels("c1", "429").inc()
    now[0] = 1030.0
    stop, port = serve_metrics("127.0.0.1:0", metrics.registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:  # loopback
            text = answer.read().decode()
    finally:
        stop()
    assert 'shellinfo_bridge_polls_total{cluster="c1",outcome="unavailable"} 1.0' in text
    assert 'shellinfo_bridge_http_responses_total{cluster="c1",code="429"} 1.0' in text
    assert 'shellinfo_bridge_seconds_since_last_successful_poll{cluster="c1"} 30.0' in text
    metrics.poll_done("c1", "ok")
    assert (
        metrics.registry.get_sample_value("shellinfo_bridge_seconds_since_last_successful_poll", {"cluster": "c1"}) == 0
    )
    assert (
        metrics.registry.get_sample_value("shellinfo_bridge_last_successful_poll_timestamp_seconds", {"cluster": "c1"})
        == 1030.0
    )


def test_each_object_has_its_own_registry() -> None:
    first, second = BridgeMetrics(), BridgeMetrics()
    first.published.labels("c1").inc()
    assert second.registry.get_sample_value("shellinfo_bridge_runs_published_total", {"cluster": "c1"}) is None
    ServiceMetrics()
    ServiceMetrics()  # no clash in a global registry


@given(st.text(max_size=20))
def test_metrics_addresses_are_host_and_port(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if sep and host and port.isdigit() and int(port) <= 65535:
        assert parse_metrics_address(address) == (host.strip("[]"), int(port))
    else:
        with pytest.raises(ConfigurationError, match="--metrics-address"):
            parse_metrics_address(address)


def test_service_metrics_count_publishes_watchers_head_and_commit_times() -> None:
    """The real server with ServiceMetrics: every publish outcome counted, watchers and head read when scraped."""

    async def main() -> None:
        metrics = ServiceMetrics()
        running = await create_server("127.0.0.1:0", MemoryStore(), ServerConfig(metrics=metrics, max_run_bytes=200))
        sample = metrics.registry.get_sample_value
        try:
            async with AsyncRunUpdateClient(f"127.0.0.1:{running.port}") as client:
                await client.publish({"jobRunId": 1, "status": "kRunning"})
                await client.publish({"jobRunId": 1, "status": "kRunning"})  # unchanged
                await client.publish({"jobRunId": 1, "status": "kSuccess"})
                with pytest.raises(RunRejected):
                    await client.publish({"jobRunId": 1, "status": "kRunning"})  # final stays final
                with pytest.raises(RunRejected):
                    await client.publish({"jobRunId": 2, "error": "x" * 300})  # over max_run_bytes
                items: list[dict[str, object]] = [
                    {"jobRunId": 3},
                    {"jobRunId": 4},
                    {"jobRunId": 1, "status": "kFailure"},
                ]
                assert len([r async for r in client.publish_many(items)]) == 3
                assert sample("shellinfo_service_watchers") == 0
                async with client.watch(start_revision=1) as watch:
                    await anext(watch)
                    assert sample("shellinfo_service_watchers") == 1
        finally:
            await running.stop(grace=0)
        assert sample("shellinfo_service_publishes_total", {"outcome": "changed"}) == 4
        assert sample("shellinfo_service_publishes_total", {"outcome": "unchanged"}) == 1
        assert sample("shellinfo_service_publishes_total", {"outcome": "refused"}) == 3
        assert sample("shellinfo_service_head_revision") == 4
        commits = sample("shellinfo_service_store_commit_seconds_count")
        assert commits is not None
        assert 5 <= commits <= 7  # one per PublishRun that reached the store, one or more for the stream

    asyncio.run(asyncio.wait_for(main(), 20))
