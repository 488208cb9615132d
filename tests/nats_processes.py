"""Real nats-server processes on 127.0.0.1, for the NATS tests and for ``bench/bench_stores.py``.

:class:`NatsNode` is one ``nats-server -js`` (client, monitoring and, in a
cluster, route ports picked at random) with its JetStream files in a directory
of the caller's; :func:`start_nodes` starts one or a cluster of several.
A node is ready when ``/healthz`` on its monitoring port is ok and JetStream
answers an account-info request through it; it can be stopped (SIGTERM),
killed (SIGKILL) and started again on the same ports and files.

Every process started through :func:`spawn` is registered for an ``atexit``
kill, so none outlives the session or the bench even when a teardown never
runs. This module does not import pytest: :mod:`nats_fixtures` adds what the
tests need on top (skipping without the binary, fixtures).
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nats

__all__ = [
    "READY_TIMEOUT",
    "STOP_TIMEOUT",
    "Managed",
    "NatsNode",
    "NotReady",
    "free_ports",
    "jetstream_ready",
    "kill",
    "kill_all",
    "nats_server_binary",
    "spawn",
    "start_nodes",
    "tail",
    "terminate",
]

READY_TIMEOUT: Final = 30.0  # seconds a process may take to become ready
STOP_TIMEOUT: Final = 10.0  # seconds a SIGTERM may take before SIGKILL

_LIVE: set[subprocess.Popen[bytes]] = set()


class NotReady(RuntimeError):
    """A process exited, or did not become ready in time; the message ends with its log."""


@atexit.register
def kill_all() -> None:
    """SIGKILL every process started through :func:`spawn` that is still there."""
    for process in list(_LIVE):
        kill(process)


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL (unless it has exited), then wait."""
    if process.poll() is None:
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(STOP_TIMEOUT)
    _LIVE.discard(process)


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, wait, then SIGKILL if it is still there."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT)
    kill(process)


def spawn(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` with standard output and error appended to ``log``; killed at exit."""
    with log.open("ab") as out:
        process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    _LIVE.add(process)
    return process


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def nats_server_binary() -> str | None:
    """The nats-server executable: on PATH, or beside this Python (a venv's bin)."""
    found = shutil.which("nats-server")
    if found:
        return found
    beside = Path(sys.executable).with_name("nats-server")
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def _http_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
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


class Managed:
    """A process started with :func:`spawn`, in ``process`` once it runs."""

    process: subprocess.Popen[bytes] | None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then wait (SIGKILL if it takes too long)."""
        if self.process is not None:
            terminate(self.process)

    def kill(self) -> None:
        """SIGKILL, then wait."""
        if self.process is not None:
            kill(self.process)


@dataclass(eq=False)
class NatsNode(Managed):
    """One nats-server with JetStream; in a cluster when ``cluster_port`` is set.

    ``sync_always`` makes it fsync every message (``sync_interval: always``)
    instead of nats-server's default of every two minutes.
    """

    binary: str
    name: str
    directory: Path
    port: int
    http_port: int
    cluster_name: str = ""
    cluster_port: int = 0
    route_ports: tuple[int, ...] = ()
    sync_always: bool = False
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

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def argv(self) -> list[str]:
        argv = [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.http_port), "-n", self.name]
        if self.sync_always:
            conf = self.directory / "nats.conf"
            store = json.dumps(str(self.directory / "store"))
            conf.write_text(f"jetstream {{\n  store_dir: {store}\n  sync_interval: always\n}}\n", encoding="utf-8")
            argv += ["-c", str(conf)]
        else:
            argv += ["-js", "-sd", str(self.directory / "store")]
        if self.cluster_port:
            routes = ",".join(f"nats://127.0.0.1:{port}" for port in self.route_ports)
            argv += ["--cluster_name", self.cluster_name, "--cluster", f"nats://127.0.0.1:{self.cluster_port}"]
            argv += ["--routes", routes]
        return argv

    def start(self, *, wait: bool = True) -> NatsNode:
        """Start the server (on the same ports and files as before, if it ran); by default wait until ready."""
        assert not self.running, f"{self.name} is already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = spawn(self.argv(), self.log)
        if wait:
            self.wait_healthy()
        return self

    def healthy(self, *, js_enabled_only: bool = False) -> bool:
        """Whether ``/healthz`` says ok (JetStream enabled and, in full, current)."""
        query = "?js-enabled-only=true" if js_enabled_only else ""
        status, body = _http_json(f"http://127.0.0.1:{self.http_port}/healthz{query}")
        return status == 200 and isinstance(body, dict) and body.get("status") == "ok"

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until ``/healthz`` is ok and JetStream answers through this node; else raise NotReady."""
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while True:
            if not self.running:
                raise NotReady(f"nats-server {self.name} exited:\n{tail(self.log)}")
            if await loop.run_in_executor(None, self.healthy) and await jetstream_ready([self.url]):
                return
            if time.monotonic() > deadline:
                raise NotReady(f"nats-server {self.name} not ready in {timeout} s:\n{tail(self.log)}")
            await asyncio.sleep(0.1)

    def wait_healthy(self, timeout: float = READY_TIMEOUT) -> None:
        """:meth:`wait_ready`, from code that runs no event loop."""
        asyncio.run(self.wait_ready(timeout))

    def jsz(self) -> dict[str, Any]:
        """The ``/jsz`` monitoring document (JetStream state of this node)."""
        _, body = _http_json(f"http://127.0.0.1:{self.http_port}/jsz")
        return body if isinstance(body, dict) else {}

    def restart(self) -> None:
        """Stop, then start again on the same ports and JetStream directory."""
        self.stop()
        self.start()


def start_nodes(
    binary: str, directory: Path, size: int, *, name: str = "shellinfo", sync_always: bool = False
) -> list[NatsNode]:
    """Start one JetStream server (``size`` 1) or a cluster ``name`` of ``size`` nodes, without waiting.

    The nodes are ``n1``, ``n2``, ... each in its own directory under ``directory``.
    """
    ports = free_ports(3 * size)
    client, http, routes = ports[:size], ports[size : 2 * size], ports[2 * size :]
    nodes = [
        NatsNode(
            binary,
            f"n{index + 1}",
            directory / f"n{index + 1}",
            client[index],
            http[index],
            cluster_name=name if size > 1 else "",
            cluster_port=routes[index] if size > 1 else 0,
            route_ports=tuple(port for other, port in enumerate(routes) if other != index) if size > 1 else (),
            sync_always=sync_always,
        )
        for index in range(size)
    ]
    try:
        for node in nodes:
            node.start(wait=False)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes
