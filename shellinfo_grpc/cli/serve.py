"""``shellinfo serve``: run the run-update service until SIGTERM or SIGINT.

It runs :func:`shellinfo_grpc.server.serve`. On start it writes one line to
standard error, ``shellinfo: serving on HOST:PORT (store URL)``, with the port
actually bound (so ``--address 127.0.0.1:0`` can be used and parsed). A setting
that cannot work (a bad flag value, a missing TLS file, a bad store URL, a port
in use) is a :class:`~shellinfo_grpc.errors.ConfigurationError`: exit status 2.

This module must not import grpc at import time: the handler imports the
server when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from shellinfo_grpc.cli._io import (
    DEFAULT_ADDRESS,
    EXIT_OK,
    PROG,
    Streams,
    Subparsers,
    command,
    count,
    one_line,
    quiet_grpc,
    seconds,
    whole,
)
from shellinfo_grpc.errors import (
    ConfigurationError,
)
from shellinfo_grpc.stores import Retention
from shellinfo_grpc.stores._registry import default_store_url, open_store

if TYPE_CHECKING:
    from shellinfo_grpc.server import RunningServer

__all__ = ["add_serve"]


# --- logging ---------------------------------------------------------------


class _OneLineFormatter(logging.Formatter):
    """Log records as ``shellinfo: LEVEL: logger: message``, an exception as its type and text."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = f"{message} ({type(exc).__name__}: {exc})"
        return one_line(f"{PROG}: {record.levelname.lower()}: {record.name}: {message}")


@contextlib.contextmanager
def _logging_to(stream: Any, level: str) -> Iterator[None]:
    """Send log records of ``level`` and above to ``stream`` while the server runs.

    Below ``debug``, records are one line each, without tracebacks.
    """
    handler = logging.StreamHandler(stream)
    numeric = getattr(logging, level.upper())
    if numeric <= logging.DEBUG:
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(name)s: %(message)s"))
    else:
        handler.setFormatter(_OneLineFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(numeric)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


# --- serve ----------------------------------------------------------------------


def _split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) as the host and the port."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigurationError(
            f"--address {address!r}: expected HOST:PORT with a port from 0 to 65535,"
            " as in 127.0.0.1:50051 or [::1]:50051"
        )
    return host, int(port_text)


def _check_port(address: str, host: str, port: int) -> None:
    """Fail early, in plain words, when ``address`` is in use or cannot be bound.

    gRPC says only "failed to bind"; this binds the way gRPC does
    (``SO_REUSEADDR``) and closes again. Port 0 always binds. gRPC listens on
    every address the host resolves to and needs one of them, so this does too.
    """
    if port == 0:
        return
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {address}: cannot resolve {name!r} ({exc.strerror})") from None
    problem: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                problem = problem or exc
            else:
                return
    if problem is not None:
        raise ConfigurationError(f"cannot listen on {address}: {(problem.strerror or str(problem)).lower()}")


def _shown_url(url: str) -> str:
    """A store URL fit for a log line: a password in it is masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def _cmd_serve(args: argparse.Namespace, io: Streams) -> int:
    """Run the run-update gRPC service until SIGTERM or SIGINT, then shut down gracefully (exit status
    0). On start, one line on standard error says the address actually bound and the store:
    'shellinfo: serving on HOST:PORT (store URL)'.
    """
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together: give both, or neither")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ConfigurationError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS works on top of TLS)")
    host, port = _split_address(args.address)
    url = args.store if args.store is not None else default_store_url()
    retention = Retention(max_updates=args.retain_updates, max_age_seconds=args.retain_seconds)

    quiet_grpc("ERROR" if args.log_level == "debug" else "NONE")
    from shellinfo_grpc.server import ServerConfig, TlsConfig, load_tokens, serve  # noqa: PLC0415 - imports grpc

    tokens = load_tokens(Path(args.token_file)) if args.token_file is not None else frozenset()
    tls = None
    if args.tls_cert is not None:
        tls = TlsConfig(
            Path(args.tls_cert),
            Path(args.tls_key),
            Path(args.tls_client_ca) if args.tls_client_ca is not None else None,
        )
        tls.credentials()  # read the files now: a missing one is reported before the store is opened
    metrics = None
    if args.metrics_address is not None:
        from shellinfo_grpc.metrics import ServiceMetrics, parse_metrics_address  # noqa: PLC0415

        parse_metrics_address(args.metrics_address)  # a bad address is reported before anything starts
        metrics = ServiceMetrics()
    config = ServerConfig(
        max_watch_queue=args.max_watch_queue,
        max_watch_queue_bytes=args.max_watch_queue_bytes,
        tokens=tokens,
        tls=tls,
        metrics=metrics,
    )
    store = open_store(url, retention=retention)
    _check_port(args.address, host, port)
    stop_metrics: Callable[[], None] | None = None
    metrics_line = ""
    if metrics is not None:
        from shellinfo_grpc.metrics import serve_metrics  # noqa: PLC0415

        stop_metrics, metrics_port = serve_metrics(args.metrics_address, metrics.registry)
        metrics_host = args.metrics_address.rpartition(":")[0]
        metrics_line = f"{PROG}: metrics on http://{metrics_host}:{metrics_port}/metrics"

    def started(running: RunningServer) -> None:
        # serve() calls this once its SIGTERM and SIGINT handlers are in place:
        # a signal sent on seeing this line shuts the server down gracefully.
        io.report(f"{PROG}: serving on {host}:{running.port} (store {_shown_url(url)})")
        if metrics_line:
            io.report(metrics_line)
        io.stderr.flush()

    try:
        with _logging_to(io.stderr, args.log_level):
            asyncio.run(serve(args.address, store, config, on_started=started))
    finally:
        if stop_metrics is not None:
            stop_metrics()
    return EXIT_OK


def add_serve(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    parser = command(subparsers, "serve", _cmd_serve, "run the run-update service")
    parser.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"where to listen (default {DEFAULT_ADDRESS}; port 0 picks a free port)",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="sqlite:///PATH (durable), memory:// (keeps nothing) or nats://HOST:PORT[,HOST:PORT...]"
        " (JetStream, for several replicas; see docs/deployment.md); default"
        " sqlite:///$XDG_STATE_HOME/shellinfo/runs.sqlite3, ~/.local/state/shellinfo/runs.sqlite3"
        " when XDG_STATE_HOME is unset",
    )
    parser.add_argument(
        "--token-file", metavar="FILE", help="require a bearer token from this file (one a line, # comments)"
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    parser.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="require client certificates signed by this CA (PEM): mutual TLS; needs --tls-cert and --tls-key",
    )
    parser.add_argument(
        "--retain-updates",
        type=whole,
        default=Retention().max_updates,
        metavar="N",
        help="keep at most the newest N updates in the history (default %(default)s; 0: no limit);"
        " every store keeps the latest state of every run regardless",
    )
    parser.add_argument(
        "--retain-seconds",
        type=seconds,
        default=0.0,
        metavar="S",
        help="drop updates older than S seconds from the history (default 0: no limit)",
    )
    parser.add_argument(
        "--max-watch-queue",
        type=count,
        default=10_000,
        metavar="N",
        help="updates a watcher may fall behind before its stream is ended to resume (default %(default)s)",
    )
    parser.add_argument(
        "--max-watch-queue-bytes",
        type=count,
        default=64 << 20,
        metavar="BYTES",
        help="bytes of updates a watcher may fall behind before its stream is ended to resume"
        " (default %(default)s, 64 MiB)",
    )
    parser.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics: publishes by outcome, watchers,"
        " the head revision, store commit latency",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        help="what the server logs to standard error (default %(default)s)",
    )
