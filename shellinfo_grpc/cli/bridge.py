"""The ``shellinfo bridge`` and ``shellinfo fake-cluster`` commands.

``shellinfo bridge`` polls one or many Cohesity clusters' REST API v1 and
publishes every change of every protection run to the run-update service (see
:mod:`shellinfo_grpc.bridge`). One cluster comes from the flags
(``--cluster URL`` with ``--username``/``--password-file`` or
``--api-key-file``); any number from a TOML file (``--config FILE``)::

    [service]                       # optional; flags override it
    address = "127.0.0.1:50051"
    token_file = "/etc/shellinfo/token"
    tls_ca = "/etc/shellinfo/service-ca.pem"

    [defaults]                      # optional; for every [[cluster]]
    interval = 30                   # seconds between polls
    lookback_hours = 24
    num_runs = 1000

    [[cluster]]
    url = "https://cluster-a.example.com"
    source = "cluster-a"            # default: the URL's host
    username = "viewer"
    password_file = "/etc/shellinfo/cluster-a.password"   # or password_env = "VAR"
    domain = "LOCAL"
    ca_file = "/etc/shellinfo/cluster-a-ca.pem"

    [[cluster]]
    url = "https://helios.example.com"
    source = "cluster-b"
    api_key_file = "/etc/shellinfo/helios.key"            # or api_key_env = "VAR"
    access_cluster_id = "1234567890"

Keys of a cluster (and of ``[defaults]``): ``interval``, ``lookback_hours``,
``num_runs``, ``connect_timeout``, ``read_timeout``, ``ca_file``,
``insecure_skip_verify``. Secrets come from files or environment variables,
never from the command line.

``--once`` polls every cluster once, publishes, and exits 0, or 1 when a
cluster failed or the service did not acknowledge everything. Otherwise the
bridge runs until SIGTERM or SIGINT, finishes the publish in flight, and exits
0.

``shellinfo fake-cluster`` serves a :class:`~shellinfo_grpc.testing.FakeCluster`
with a few jobs whose runs progress in real time, for trying the bridge and
testing consumers.

:func:`add_bridge` and :func:`add_fake_cluster` declare the commands (listed in
``COMMANDS`` of :mod:`shellinfo_grpc.cli`); :func:`run` and
:func:`run_fake_cluster` do the work and raise
:class:`~shellinfo_grpc.errors.ConfigurationError` for settings that cannot
work (one line, exit status 2, from the command line's ``main``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TextIO

from shellinfo_grpc.cli._io import DEFAULT_ADDRESS as _DEFAULT_ADDRESS
from shellinfo_grpc.cli._io import PROG as _PROG
from shellinfo_grpc.cli._io import Streams, Subparsers
from shellinfo_grpc.errors import ConfigurationError

__all__ = ["add_bridge", "add_fake_cluster", "load_config", "run", "run_fake_cluster"]

_PASSWORD_ENV: Final = "SHELLINFO_CLUSTER_PASSWORD"  # noqa: S105 - the variable's name, not a password
_API_KEY_ENV: Final = "SHELLINFO_CLUSTER_API_KEY"
_HOUR: Final = 3600.0

#: Keys a [[cluster]] table may have, with what each must be.
_CLUSTER_KEYS: Final = {
    "url": str,
    "source": str,
    "username": str,
    "password_file": str,
    "password_env": str,
    "domain": str,
    "api_key_file": str,
    "api_key_env": str,
    "access_cluster_id": str,
    "ca_file": str,
    "insecure_skip_verify": bool,
    "interval": float,
    "lookback_hours": float,
    "num_runs": int,
    "connect_timeout": float,
    "read_timeout": float,
}
_DEFAULT_KEYS: Final = frozenset(
    {"interval", "lookback_hours", "num_runs", "connect_timeout", "read_timeout", "ca_file", "insecure_skip_verify"}
)
_SERVICE_KEYS: Final = {"address": str, "token_file": str, "tls_ca": str, "tls_cert": str, "tls_key": str}


# --- reading settings ------------------------------------------------------------------


def _read_secret(path: str, what: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"{what}: {path} is not UTF-8 text") from None
    if not text:
        raise ConfigurationError(f"{what}: {path} is empty")
    return text


def _env_secret(name: str, what: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigurationError(f"{what}: the environment variable {name} is unset or empty")
    return value


def _checked(table: Mapping[str, Any], kinds: Mapping[str, type], where: str) -> dict[str, Any]:
    """The table's values, type-checked; unknown keys and wrong types name the key."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        kind = kinds.get(key)
        if kind is None:
            raise ConfigurationError(f"{where}.{key}: unknown key; expected one of {', '.join(sorted(kinds))}")
        if kind is float and type(value) in (int, float):
            out[key] = float(value)
        elif type(value) is kind:  # int is exactly int: a bool is not a count
            out[key] = value
        else:
            expected = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}[kind]
            raise ConfigurationError(f"{where}.{key}: expected {expected}, got {value!r}")
    return out


def _cluster_config(options: Mapping[str, Any], where: str, base: Path) -> Any:
    from shellinfo_grpc.bridge import ClusterConfig, Credentials  # noqa: PLC0415 - imports grpc, aiohttp

    def path(key: str) -> Path | None:
        value = options.get(key)
        return None if value is None else (base / value).expanduser()

    if "url" not in options:
        raise ConfigurationError(f"{where}.url: required")
    if ("password_file" in options) and ("password_env" in options):
        raise ConfigurationError(f"{where}: give password_file or password_env, not both")
    if ("api_key_file" in options) and ("api_key_env" in options):
        raise ConfigurationError(f"{where}: give api_key_file or api_key_env, not both")
    password = api_key = None
    if "password_file" in options:
        password = _read_secret(str(path("password_file")), f"{where}.password_file")
    elif "password_env" in options:
        password = _env_secret(options["password_env"], f"{where}.password_env")
    if "api_key_file" in options:
        api_key = _read_secret(str(path("api_key_file")), f"{where}.api_key_file")
    elif "api_key_env" in options:
        api_key = _env_secret(options["api_key_env"], f"{where}.api_key_env")
    try:
        credentials = Credentials(
            username=options.get("username"),
            password=password,
            domain=options.get("domain", "LOCAL"),
            api_key=api_key,
            access_cluster_id=options.get("access_cluster_id"),
        )
        settings: dict[str, Any] = {
            key: options[key] for key in ("interval", "num_runs", "connect_timeout", "read_timeout") if key in options
        }
        if "lookback_hours" in options:
            settings["lookback"] = options["lookback_hours"] * _HOUR
        return ClusterConfig(
            options["url"],
            credentials,
            source=options.get("source"),
            ca_file=path("ca_file"),
            insecure_skip_verify=options.get("insecure_skip_verify", False),
            **settings,
        )
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None


def load_config(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """Read a ``--config`` TOML file: its clusters (``ClusterConfig``) and its ``[service]`` table.

    Relative file names in it are relative to the file's folder.
    """
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigurationError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"--config {path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"service", "defaults", "cluster"}
    if unknown:
        raise ConfigurationError(
            f"--config {path}: unknown table {sorted(unknown)[0]!r}; expected service, defaults, cluster"
        )
    for name in ("service", "defaults"):
        if not isinstance(data.get(name, {}), dict):
            raise ConfigurationError(f"--config {path}: [{name}] must be a table")
    service = _checked(data.get("service", {}), _SERVICE_KEYS, "service")
    defaults = _checked(
        data.get("defaults", {}), {k: v for k, v in _CLUSTER_KEYS.items() if k in _DEFAULT_KEYS}, "defaults"
    )
    tables = data.get("cluster", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigurationError(f"--config {path}: clusters are [[cluster]] tables")
    base = path.parent
    clusters = [
        _cluster_config({**defaults, **_checked(table, _CLUSTER_KEYS, f"cluster[{i}]")}, f"cluster[{i}]", base)
        for i, table in enumerate(tables)
    ]
    if "token_file" in service:
        service["token_file"] = str(base / service["token_file"])
    for key in ("tls_ca", "tls_cert", "tls_key"):
        if key in service:
            service[key] = str(base / service[key])
    return clusters, service


def _flag_cluster(args: argparse.Namespace) -> Any:
    """The cluster the flags describe (``--cluster`` and friends)."""
    options: dict[str, Any] = {"url": args.cluster}
    for key in ("source", "username", "domain", "access_cluster_id", "ca_file", "num_runs"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.insecure_skip_verify:
        options["insecure_skip_verify"] = True
    for key in ("interval", "connect_timeout", "read_timeout"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.lookback is not None:
        options["lookback_hours"] = args.lookback
    if args.username is not None:
        if args.api_key_file is not None:
            raise ConfigurationError("give --username (with --password-file) or --api-key-file, not both")
        if args.password_file is not None:
            options["password_file"] = args.password_file
        else:
            options["password_env"] = _PASSWORD_ENV
    elif args.api_key_file is not None:
        options["api_key_file"] = args.api_key_file
    elif os.environ.get(_API_KEY_ENV):
        options["api_key_env"] = _API_KEY_ENV
    else:
        raise ConfigurationError(
            f"--cluster needs credentials: --username with --password-file (or ${_PASSWORD_ENV}),"
            f" or --api-key-file (or ${_API_KEY_ENV})"
        )
    if args.password_file is not None and args.username is None:
        raise ConfigurationError("--password-file goes with --username")
    return _cluster_config(options, "--cluster", Path.cwd())


# --- logging -------------------------------------------------------------------------------


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = " ".join(record.getMessage().splitlines())
        return f"{_PROG}: {record.levelname.lower()}: {text}"


@contextlib.contextmanager
def _logging_to(stream: TextIO, level: str) -> Iterator[None]:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("shellinfo_grpc")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level.upper()))
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


# --- bridge -------------------------------------------------------------------------------------


def run(args: argparse.Namespace, *, stderr: TextIO | None = None) -> int:
    """Run ``shellinfo bridge`` with parsed ``args``; return the exit status."""
    err = stderr if stderr is not None else sys.stderr
    clusters: list[Any] = []
    service: dict[str, Any] = {}
    if args.config is not None:
        clusters, service = load_config(Path(args.config))
    if args.cluster is not None:
        clusters.append(_flag_cluster(args))
    elif any(getattr(args, key) is not None for key in ("username", "password_file", "api_key_file", "source")):
        raise ConfigurationError("--username, --password-file, --api-key-file and --source go with --cluster")
    if not clusters:
        raise ConfigurationError("nothing to bridge: give --cluster URL or --config FILE")

    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # errors reach the user as log lines
    from shellinfo_grpc.bridge import Bridge, ServiceConfig  # noqa: PLC0415 - imports grpc, aiohttp
    from shellinfo_grpc.metrics import BridgeMetrics, serve_metrics  # noqa: PLC0415

    token = args.token
    token_file = args.token_file if args.token_file is not None else service.get("token_file")
    if token_file is not None:
        if token is not None:
            raise ConfigurationError("give --token or --token-file, not both")
        token = _read_secret(token_file, "--token-file")
    tls_cert = args.tls_cert or service.get("tls_cert")
    tls_key = args.tls_key or service.get("tls_key")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together: give both, or neither")
    tls_ca = args.tls_ca or service.get("tls_ca")
    target = ServiceConfig(
        args.address or service.get("address") or os.environ.get("SHELLINFO_ADDRESS") or _DEFAULT_ADDRESS,
        token=token,
        tls_ca=Path(tls_ca) if tls_ca else None,
        tls_cert=Path(tls_cert) if tls_cert else None,
        tls_key=Path(tls_key) if tls_key else None,
    )
    metrics = BridgeMetrics()
    stop_metrics = None
    if args.metrics_address is not None:
        stop_metrics, port = serve_metrics(args.metrics_address, metrics.registry)
        print(f"{_PROG}: metrics on http://{args.metrics_address.rpartition(':')[0]}:{port}/metrics", file=err)

    async def main() -> int:
        async with Bridge(clusters, target, metrics=metrics) as bridge:
            if args.once:
                result = await bridge.run_once()
                return 0 if result.ok else 1
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, bridge.stop)
            names = ", ".join(c.name for c in clusters)
            print(f"{_PROG}: bridging {names} to {target.address}", file=err)
            err.flush()
            try:
                await bridge.run()
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            return 0

    try:
        with _logging_to(err, args.log_level):
            return asyncio.run(main())
    finally:
        if stop_metrics is not None:
            stop_metrics()


def _cmd_bridge(args: argparse.Namespace, io: Streams) -> int:
    return run(args, stderr=io.stderr)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def add_bridge(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Declare ``shellinfo bridge`` on ``subparsers``; its ``handler`` is ``(args, io) -> int``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bridge",
        help="publish the runs of Cohesity clusters to the service",
        description="Poll Cohesity clusters (REST API v1) and publish every change of every protection run to"
        " the run-update service, until SIGTERM or SIGINT (exit status 0); with --once, poll each cluster once"
        " and exit 0, or 1 if anything failed. Passwords and API keys are read from files or environment"
        " variables, never from the command line.",
        # No abbreviations: "--password SECRET" must not pass as --password-file
        # (and then show up in an error message).
        allow_abbrev=False,
    )
    cluster = parser.add_argument_group("cluster (or several, with --config)")
    cluster.add_argument("--cluster", metavar="URL", help="the cluster's base URL, https://HOST[:PORT]")
    cluster.add_argument("--source", help="the source name of its runs in the service (default: the URL's host)")
    cluster.add_argument("--username", help="log in as this user (a read-only viewer is enough)")
    cluster.add_argument(
        "--password-file", metavar="FILE", help=f"the user's password, from this file (default ${_PASSWORD_ENV})"
    )
    cluster.add_argument("--domain", help="the user's domain (default LOCAL)")
    cluster.add_argument(
        "--api-key-file", metavar="FILE", help=f"authenticate with the API key in this file (or ${_API_KEY_ENV})"
    )
    cluster.add_argument("--access-cluster-id", metavar="ID", help="with an API key: the cluster, through Helios")
    tls = cluster.add_mutually_exclusive_group()
    tls.add_argument("--ca-file", metavar="FILE", help="verify the cluster's certificate against this CA (PEM)")
    tls.add_argument(
        "--insecure-skip-verify", action="store_true", help="do NOT verify the cluster's certificate (warned about)"
    )
    cluster.add_argument("--interval", type=_positive, metavar="SECONDS", help="between polls (default 30)")
    cluster.add_argument("--lookback", type=_positive, metavar="HOURS", help="how far back to look (default 24)")
    cluster.add_argument("--num-runs", type=_count, metavar="N", help="numRuns of a query (default 1000)")
    cluster.add_argument("--connect-timeout", type=_positive, metavar="SECONDS", help="per request (default 10)")
    cluster.add_argument("--read-timeout", type=_positive, metavar="SECONDS", help="per request (default 60)")
    parser.add_argument("--config", metavar="FILE", help="a TOML file listing clusters (see the documentation)")
    parser.add_argument("--once", action="store_true", help="poll every cluster once, publish, and exit")
    parser.add_argument("--metrics-address", metavar="HOST:PORT", help="serve Prometheus metrics here")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info", help="(default %(default)s)"
    )
    service = parser.add_argument_group("service")
    service.add_argument(
        "--address",
        metavar="HOST:PORT",
        help=f"the service (default: the config file's, else $SHELLINFO_ADDRESS, else {_DEFAULT_ADDRESS})",
    )
    service.add_argument(
        "--token", default=os.environ.get("SHELLINFO_TOKEN") or None, help="bearer token (default $SHELLINFO_TOKEN)"
    )
    service.add_argument("--token-file", metavar="FILE", help="read the bearer token from this file")
    service.add_argument("--tls-ca", metavar="FILE", help="use TLS, trusting the service certificates this CA signs")
    service.add_argument("--tls-cert", metavar="FILE", help="client certificate for mutual TLS (PEM)")
    service.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    parser.set_defaults(handler=_cmd_bridge)


# --- fake-cluster ------------------------------------------------------------------------------------


def run_fake_cluster(args: argparse.Namespace, *, stderr: TextIO | None = None) -> int:
    """Serve a FakeCluster whose runs progress in real time, until SIGTERM or SIGINT."""
    err = stderr if stderr is not None else sys.stderr
    from shellinfo_grpc.testing import FakeCluster  # noqa: PLC0415 - imports aiohttp

    host, _, port_text = args.address.rpartition(":")
    if not host or not port_text.isdigit():
        raise ConfigurationError(f"--address {args.address!r}: expected HOST:PORT, as in 127.0.0.1:8443")
    users = {args.username: _read_secret(args.password_file, "--password-file")} if args.password_file else None
    cluster = FakeCluster(host=host.strip("[]"), port=int(port_text), users=users)
    try:
        cluster.start()
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {args.address}: {exc.strerror}") from None
    jobs = [cluster.add_job(name) for name in ("vm-daily", "sql-logs", "nas-weekly")]
    stop = asyncio.Event()

    async def tick() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Only now: a signal sent on seeing this line stops the cluster cleanly.
        user = f"user {args.username}" if args.password_file else "user admin, password admin"
        print(f"{_PROG}: fake cluster on {cluster.url} ({user})", file=err)
        err.flush()
        last, number = time.time(), 0
        timelines = (
            (("kAccepted", 0.0), ("kRunning", 5.0), ("kSuccess", 60.0)),
            (("kAccepted", 0.0), ("kRunning", 3.0), ("kFailure", 45.0)),
            (("kRunning", 0.0), ("kWarning", 30.0)),
        )
        while not stop.is_set():
            now = time.time()
            cluster.advance(max(now - last, 0.0))
            last = now
            if number % 20 == 0:  # a new run every 20 seconds
                kind = (number // 20) % len(jobs)
                cluster.add_run(jobs[kind], timeline=timelines[kind], error="simulated failure")
            number += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    try:
        asyncio.run(tick())
    finally:
        cluster.close()
    return 0


def _cmd_fake_cluster(args: argparse.Namespace, io: Streams) -> int:
    return run_fake_cluster(args, stderr=io.stderr)


def add_fake_cluster(subparsers: Subparsers[argparse.ArgumentParser]) -> None:
    """Declare ``shellinfo fake-cluster`` on ``subparsers``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "fake-cluster",
        help="serve a stand-in Cohesity cluster for trying the bridge",
        description="Serve a stand-in for a Cohesity cluster's REST API v1 over HTTP (testing only), with three"
        " jobs whose runs are queued, run and finish in real time, until SIGTERM or SIGINT.",
    )
    parser.add_argument("--address", default="127.0.0.1:8080", metavar="HOST:PORT", help="(default %(default)s)")
    parser.add_argument("--username", default="admin", help="the user to accept (default %(default)s)")
    parser.add_argument("--password-file", metavar="FILE", help="that user's password (default: admin)")
    parser.set_defaults(handler=_cmd_fake_cluster)
