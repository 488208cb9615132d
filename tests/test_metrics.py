"""shellinfo_grpc.metrics: the bridge's metrics, served over HTTP by prometheus_client, one registry each."""

from __future__ import annotations

import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shellinfo_grpc.errors import ConfigurationError
from shellinfo_grpc.metrics import BridgeMetrics, ServiceMetrics, parse_metrics_address, serve_metrics

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
