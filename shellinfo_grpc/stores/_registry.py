"""How a store URL picks a backend.

* ``memory://``: :class:`~shellinfo_grpc.stores.memory.MemoryStore`, for
  tests and throwaway use; nothing survives the process.
* ``sqlite:///PATH``: :class:`~shellinfo_grpc.stores.sqlite.SqliteStore`, the
  embedded default; an update is acknowledged only once it is durable.
* ``nats://HOST:PORT[,HOST:PORT...]``: :class:`~shellinfo_grpc.stores.nats.NatsStore`,
  one JetStream stream shared by several replicas of the service (the
  ``nats`` extra). Its retention also forgets runs whose last update it trims.

The backends import :mod:`shellinfo_grpc.stores` for the interface; this
module imports the backends, so the interface never imports them and there
is no circle. The NATS backend is imported only when a URL asks for it: it
needs the ``nats`` extra.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from shellinfo_grpc.errors import ConfigurationError
from shellinfo_grpc.stores import Retention, Store
from shellinfo_grpc.stores.memory import MemoryStore
from shellinfo_grpc.stores.sqlite import SqliteStore

__all__ = ["default_store_url", "open_store"]


def default_store_url() -> str:
    """The store URL ``shellinfo serve`` uses by default: the SQLite file
    ``$XDG_STATE_HOME/shellinfo/runs.sqlite3``, by default
    ``~/.local/state/shellinfo/runs.sqlite3``."""
    state = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):  # the XDG spec: ignore a relative path
        state = str(Path.home() / ".local" / "state")
    return f"sqlite://{quote(str(Path(state) / 'shellinfo' / 'runs.sqlite3'))}"


def open_store(url: str, *, retention: Retention | None = None) -> Store:
    """Make the store a URL names: ``memory://``, ``sqlite:///PATH[?synchronous=NORMAL]`` or ``nats://HOST:PORT``.

    The store is not started; call :meth:`Store.start`. Query parameters
    configure backend options (for NATS: ``stream``, ``subject_prefix``,
    ``replicas``, ...).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    keep = retention or Retention()
    if scheme == "memory":
        return MemoryStore(retention=keep)
    if scheme == "sqlite":
        path = unquote(parts.netloc + parts.path)
        if not path or path == "/":
            raise ConfigurationError(f"store URL {url!r}: give a path, as in sqlite:///var/lib/shellinfo/runs.sqlite3")
        options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        unknown = set(options) - {"synchronous"}
        if unknown:
            raise ConfigurationError(f"store URL {url!r}: unknown option(s) {', '.join(sorted(unknown))}")
        return SqliteStore(Path(path).expanduser(), retention=keep, synchronous=options.get("synchronous", "FULL"))
    if scheme in {"nats", "tls"}:
        try:
            from shellinfo_grpc.stores.nats import NatsStore  # noqa: PLC0415 - needs the nats extra
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(f"store URL {url!r}: the NATS backend is not available ({exc})") from None
        options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        return NatsStore.from_url(url, options=options, retention=keep)
    raise ConfigurationError(f"store URL {url!r}: unknown scheme; use memory://, sqlite:///PATH or nats://HOST:PORT")
