"""A store on NATS JetStream, so that several replicas of the service share one history.

One JetStream stream holds every accepted update; the **revision is the stream
sequence**, so the order is global across all replicas. Each run has its own
subject, ``<prefix>.<source token>.<jobRunId>``, and its latest state is the
last message on that subject: there is no second database.

How the service's rules hold across replicas:

* **Idempotence and final statuses.** A publish reads the run's last message,
  decides on the update against it (:func:`shellinfo_grpc.stores.decide`), and publishes with
  the header ``Nats-Expected-Last-Subject-Sequence`` set to that message's
  sequence (0 for a new run). If another replica wrote the run in between,
  JetStream refuses the write (error 10071) and the publish starts over from
  the new state, up to ``max_attempts`` times. Two replicas can therefore never
  both record a change from the same state, a final status stays final, and a
  retried publish whose first attempt did land finds an identical state and
  returns its revision.
* **Nothing acknowledged that was not stored.** An update is acknowledged only
  after JetStream's publish acknowledgement (stored on a quorum of the
  stream's replicas). When NATS cannot be reached, publishes fail with
  :class:`~shellinfo_grpc.errors.StoreUnavailable` (gRPC ``UNAVAILABLE``); the
  client reconnects by itself and the store works again when NATS returns.
* **Live updates.** Each replica follows the stream with an ordered consumer
  and tells its listeners about every message in sequence order, whichever
  replica published it.

Limitation: the stream's retention (``Retention``) applies to every message,
so a run whose last update is older than the retained history is forgotten
(it disappears from GetRun and ListRuns, and its final status is no longer
enforced). Keep the retention well above the lifetime of a run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from shellinfo_grpc._gen.shellinfo.v1 import protection_job_pb2 as _job_pb
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as _pb
from shellinfo_grpc._gen.shellinfo.v1 import run_update_service_pb2 as _svc
from shellinfo_grpc.errors import ConfigurationError, HistoryExpired, RunRejected, StoreUnavailable
from shellinfo_grpc.rules import compile_filter
from shellinfo_grpc.stores import Item, PublishOutcome, Retention, Store, decide, new_update, now_usecs

__all__ = ["NatsStore"]

_log = logging.getLogger("shellinfo_grpc.nats_store")  # its name before the move, kept for log filters

_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST_SEQUENCE: Final = 10071
_OPTIONS: Final = frozenset(
    {"stream", "subject_prefix", "replicas", "creds", "tls_ca", "tls_cert", "tls_key", "timeout", "max_attempts"}
)
# Errors that mean "NATS cannot be reached or did not answer in time".
_UNREACHABLE: Final = (nats.errors.Error, asyncio.TimeoutError, OSError)


def _source_token(source: str) -> str:
    """A subject token for ``source``: any text, even empty, becomes [A-Za-z0-9_-]+."""
    return "s" + base64.urlsafe_b64encode(source.encode("utf-8")).decode("ascii").rstrip("=")


class NatsStore(Store):
    """A :class:`~shellinfo_grpc.stores.Store` on one JetStream stream.

    ``servers``: NATS URLs (``nats://host:port``, with credentials in the URL
    if needed). ``stream``/``subject_prefix``: where updates live (created on
    start if missing, with ``replicas`` copies and the retention limits).
    ``connect_options`` go to ``nats.connect`` (``tls``, ``user_credentials``,
    ...). ``timeout``: seconds for each JetStream request. ``max_attempts``:
    how often a publish retries when other replicas keep writing the same run.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        stream: str = "SHELLINFO_RUNS",
        subject_prefix: str = "shellinfo.runs",
        replicas: int = 1,
        retention: Retention | None = None,
        connect_options: Mapping[str, Any] | None = None,
        timeout: float = 5.0,
        max_attempts: int = 10,
    ) -> None:
        super().__init__()
        if not servers:
            raise ConfigurationError("NATS store: no server given")
        if not stream or any(c in stream for c in ". *>\t"):
            raise ConfigurationError(f"NATS store: stream name {stream!r} must be one token without . * >")
        if not subject_prefix or any(c in subject_prefix for c in " *>\t") or subject_prefix.endswith("."):
            raise ConfigurationError(f"NATS store: subject prefix {subject_prefix!r} is not a valid subject")
        if replicas < 1 or max_attempts < 1 or timeout <= 0:
            raise ConfigurationError("NATS store: replicas, max_attempts and timeout must be positive")
        self._servers = list(servers)
        self._stream = stream
        self._prefix = subject_prefix
        self._replicas = replicas
        self._retention = retention or Retention()
        self._connect_options = dict(connect_options or {})
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._nc: Any = None
        self._js: Any = None
        self._jsm: Any = None
        self._live: Any = None
        self._head = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._lock_users: dict[str, int] = {}

    # --- configuration -----------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, options: Mapping[str, str], retention: Retention | None = None) -> NatsStore:
        """Build a store from a ``--store`` URL.

        ``nats://[user:password@]host:port[,host:port...]?stream=...&subject_prefix=...&replicas=3``;
        ``creds=PATH`` for a credentials file; ``tls_ca``, ``tls_cert``,
        ``tls_key`` (PEM paths) for TLS (``tls://`` also turns TLS on).
        """
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigurationError(f"store URL {url!r}: unknown option(s) {', '.join(sorted(unknown))}")
        parts = urlsplit(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        if not hosts:
            raise ConfigurationError(f"store URL {url!r}: give at least one host:port")
        prefix = f"{userinfo}@" if userinfo else ""
        servers = [f"{parts.scheme}://{prefix}{host}" for host in hosts.split(",") if host]
        connect: dict[str, Any] = {}
        if "creds" in options:
            creds = Path(options["creds"]).expanduser()
            if not creds.is_file():
                raise ConfigurationError(f"store URL {url!r}: credentials file {creds} not found")
            connect["user_credentials"] = str(creds)
        if parts.scheme == "tls" or {"tls_ca", "tls_cert", "tls_key"} & set(options):
            connect["tls"] = _tls_context(options)
        try:
            return cls(
                servers,
                stream=options.get("stream", "SHELLINFO_RUNS"),
                subject_prefix=options.get("subject_prefix", "shellinfo.runs"),
                replicas=int(options.get("replicas", "1")),
                retention=retention,
                connect_options=connect,
                timeout=float(options.get("timeout", "5")),
                max_attempts=int(options.get("max_attempts", "10")),
            )
        except ValueError as exc:
            raise ConfigurationError(f"store URL {url!r}: {exc}") from None

    def _shown_servers(self) -> str:
        """The server URLs for messages, without passwords or tokens."""
        shown = []
        for server in self._servers:
            parts = urlsplit(server)
            host = parts.netloc.rpartition("@")[2]
            shown.append(f"{parts.scheme}://{'***@' if '@' in parts.netloc else ''}{host}")
        return ", ".join(shown)

    def _subject(self, source: str, job_run_id: int) -> str:
        return f"{self._prefix}.{_source_token(source)}.{job_run_id}"

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create the stream if it is missing, and follow it from its head."""
        connect = nats.connect(
            self._servers,
            name="shellinfo-grpc",
            max_reconnect_attempts=-1,  # keep trying: the service recovers when NATS returns
            reconnect_time_wait=0.5,
            connect_timeout=max(1, int(self._timeout)),
            allow_reconnect=True,
            error_cb=self._on_nats_error,
            **self._connect_options,
        )
        try:
            # nats-py retries a first connection as long as later ones: bound it,
            # so that a wrong address fails start-up instead of hanging it.
            self._nc = await asyncio.wait_for(connect, timeout=2 * self._timeout)
        except (*_UNREACHABLE, TimeoutError) as exc:
            reason = f"no answer within {2 * self._timeout:g} s" if isinstance(exc, TimeoutError) else str(exc)
            raise ConfigurationError(f"NATS store: cannot connect to {self._shown_servers()}: {reason}") from None
        self._js = self._nc.jetstream(timeout=self._timeout)
        self._jsm = self._nc.jsm(timeout=self._timeout)
        try:
            info = await self._ensure_stream()
            self._head = info.state.last_seq
            self._live = await self._js.subscribe(
                f"{self._prefix}.>",
                stream=self._stream,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                config=api.ConsumerConfig(opt_start_seq=self._head + 1),
                cb=self._on_message,
                idle_heartbeat=2.0,
            )
        except _UNREACHABLE as exc:
            await self._nc.close()
            raise ConfigurationError(f"NATS store: cannot set up stream {self._stream}: {exc}") from None

    async def _ensure_stream(self) -> Any:
        try:
            return await self._jsm.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            pass
        config = api.StreamConfig(
            name=self._stream,
            subjects=[f"{self._prefix}.>"],
            storage=api.StorageType.FILE,
            num_replicas=self._replicas,
            max_msgs=self._retention.max_updates or -1,
            max_age=self._retention.max_age_seconds or None,
            discard=api.DiscardPolicy.OLD,
            allow_direct=True,
        )
        await self._jsm.add_stream(config)
        return await self._jsm.stream_info(self._stream)

    async def close(self) -> None:
        """Stop following the stream and drain the connection."""
        nc, self._nc = self._nc, None
        if nc is None:
            return
        with contextlib.suppress(*_UNREACHABLE):
            if self._live is not None:
                await self._live.unsubscribe()
        with contextlib.suppress(*_UNREACHABLE):
            await nc.drain()
        with contextlib.suppress(*_UNREACHABLE):
            await nc.close()

    async def _on_nats_error(self, exc: Exception) -> None:
        # nats-py reports connection trouble here (and keeps reconnecting):
        # one line, no traceback, no credentials.
        _log.warning("NATS %s: %s: %s", self._shown_servers(), type(exc).__name__, exc)

    async def _on_message(self, msg: Any) -> None:
        seq = msg.metadata.sequence.stream
        self._head = max(self._head, seq)
        if self._waiters:
            waiting = []
            for wanted, waiter in self._waiters:
                if wanted <= seq:
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    waiting.append((wanted, waiter))
            self._waiters = waiting
        update = self._decode(msg.data, seq)
        if update is None:
            return
        self.notify_listeners((update,))

    def _decode(self, data: bytes, seq: int) -> _svc.RunUpdate | None:
        try:
            update = _svc.RunUpdate.FromString(data)
        except Exception:  # a foreign message on our subjects: skip it, loudly
            _log.warning("stream %s: message %d is not a RunUpdate; skipped", self._stream, seq)
            return None
        update.revision = seq
        return update

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        error = StoreUnavailable(f"NATS store: {what}: {type(exc).__name__}: {exc}".rstrip(": "))
        error.__cause__ = exc
        return error

    # --- writing -----------------------------------------------------------------

    async def _last(self, subject: str) -> tuple[int, _svc.RunUpdate | None]:
        """The sequence of the last message on ``subject`` (0: none) and its update.

        The update is ``None`` when there is no message, or when the last one
        is not a RunUpdate (a foreign publisher): its sequence still counts for
        the optimistic write.
        """
        try:
            raw = await self._jsm.get_last_msg(self._stream, subject)
        except nats.js.errors.NotFoundError:
            return 0, None
        return raw.seq, self._decode(raw.data or b"", raw.seq)

    async def _followed(self, seq: int) -> None:
        """Wait (bounded) until this replica's live feed has passed ``seq``.

        Then the update is in ``head_revision()`` and its listeners have heard
        of it when the publish returns, as with the other stores. If the feed
        is slow (NATS trouble), the publish still returns: it is stored.
        """
        if self._head >= seq:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, waiter))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), timeout=self._timeout)

    async def _publish_one(
        self, source: str, run: _pb.ProtectionShellInfo, job: _job_pb.ProtectionJob | None
    ) -> PublishOutcome | RunRejected:
        subject = self._subject(source, run.job_run_id)
        # Publishes of one run through this replica take turns, so that only
        # other replicas can make the optimistic write of a run fail.
        lock = self._locks.setdefault(subject, asyncio.Lock())
        self._lock_users[subject] = self._lock_users.get(subject, 0) + 1
        try:
            async with lock:
                outcome = await self._publish_locked(subject, source, run, job)
        finally:
            self._lock_users[subject] -= 1
            if not self._lock_users[subject]:
                del self._lock_users[subject], self._locks[subject]
        if isinstance(outcome, PublishOutcome) and outcome.changed:
            await self._followed(outcome.update.revision)  # outside the lock: a slow feed delays only this call
        return outcome

    async def _publish_locked(
        self, subject: str, source: str, run: _pb.ProtectionShellInfo, job: _job_pb.ProtectionJob | None
    ) -> PublishOutcome | RunRejected:
        payload_run = run.SerializeToString(deterministic=True)
        for attempt in range(self._max_attempts):
            if attempt:
                await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))  # noqa: S311 - jitter
            last_seq, current = await self._last(subject)
            outcome = decide(current, run, job)
            if outcome is not None:
                return outcome
            # The job travels inside the stored RunUpdate, as the run does.
            update = new_update(source, _pb.ProtectionShellInfo(), job, current, accepted_time_usecs=now_usecs())
            update.run.MergeFromString(payload_run)
            headers = {_EXPECTED_LAST_SUBJECT_SEQ: str(last_seq)}
            try:
                ack = await self._js.publish(subject, update.SerializeToString(), stream=self._stream, headers=headers)
            except nats.js.errors.APIError as exc:
                if exc.err_code == _WRONG_LAST_SEQUENCE:
                    continue  # another replica wrote this run: decide again on its new state
                raise
            update.revision = ack.seq
            return PublishOutcome(update, changed=True)
        raise StoreUnavailable(
            f"NATS store: run {run.job_run_id} of source {source!r} kept changing under "
            f"{self._max_attempts} attempts; try again"
        )

    async def record_batch(self, items: Sequence[Item]) -> list[PublishOutcome | RunRejected]:
        """Apply updates: different runs concurrently, updates of one run in order.

        Outcomes come back in request order, but the revisions of different
        runs within one batch may not follow it (each run's do).
        """
        by_run: dict[tuple[str, int], list[int]] = {}
        for index, (source, run, _job) in enumerate(items):
            by_run.setdefault((source, run.job_run_id), []).append(index)
        outcomes: list[PublishOutcome | RunRejected | None] = [None] * len(items)

        async def run_in_order(indexes: list[int]) -> None:
            for index in indexes:
                outcomes[index] = await self._publish_one(*items[index])

        try:
            await asyncio.gather(*(run_in_order(indexes) for indexes in by_run.values()))
        except _UNREACHABLE as exc:
            raise self._unavailable("publish failed", exc) from None
        assert all(outcome is not None for outcome in outcomes)
        return outcomes  # type: ignore[return-value]

    # --- reading -----------------------------------------------------------------

    async def get(self, source: str, job_run_id: int) -> _svc.RunUpdate | None:
        """The last message on the run's subject."""
        try:
            return (await self._last(self._subject(source, job_run_id)))[1]
        except _UNREACHABLE as exc:
            raise self._unavailable("cannot read the run", exc) from None

    async def _read(self, deliver: api.DeliverPolicy, start: int, end: int, limit: int) -> list[_svc.RunUpdate]:
        """Read messages through an ephemeral ordered consumer, up to ``end`` or ``limit``."""
        out: list[_svc.RunUpdate] = []
        config = api.ConsumerConfig(opt_start_seq=start) if deliver == api.DeliverPolicy.BY_START_SEQUENCE else None
        sub = await self._js.subscribe(
            f"{self._prefix}.>", stream=self._stream, ordered_consumer=True, deliver_policy=deliver, config=config
        )
        try:
            while len(out) < limit:
                msg = await sub.next_msg(timeout=self._timeout)
                meta = msg.metadata
                if not out and deliver == api.DeliverPolicy.BY_START_SEQUENCE and meta.sequence.stream > start:
                    # Retention trimmed the start away after the oldest
                    # revision was checked: JetStream began at the oldest
                    # message it still has. Never skip updates silently.
                    raise HistoryExpired(start, meta.sequence.stream)
                if meta.sequence.stream > end:
                    break
                update = self._decode(msg.data, meta.sequence.stream)
                if update is not None:
                    out.append(update)
                if meta.num_pending == 0 or meta.sequence.stream == end:
                    break
        finally:
            with contextlib.suppress(*_UNREACHABLE):
                await sub.unsubscribe()
        return out

    async def _state(self) -> Any:
        return (await self._jsm.stream_info(self._stream)).state

    async def history(self, start_revision: int, end_revision: int, limit: int) -> list[_svc.RunUpdate]:
        """Messages with sequence in ``[start_revision, end_revision]``, from the stream."""
        try:
            state = await self._state()
            oldest = state.first_seq if state.messages else state.last_seq + 1
            if start_revision < oldest:
                raise HistoryExpired(start_revision, oldest)
            last = min(end_revision, state.last_seq)
            if start_revision > last or limit <= 0:
                return []
            return await self._read(api.DeliverPolicy.BY_START_SEQUENCE, start_revision, last, limit)
        except _UNREACHABLE as exc:
            raise self._unavailable("cannot read the history", exc) from None

    async def snapshot(self, flt: _svc.RunFilter | None) -> tuple[list[_svc.RunUpdate], int]:
        """The last message of every run (a last-per-subject consumer), in revision order."""
        try:
            state = await self._state()
            if not state.messages:
                return [], state.last_seq
            latest: dict[tuple[str, int], _svc.RunUpdate] = {}
            for update in await self._read(api.DeliverPolicy.LAST_PER_SUBJECT, 0, 2**63 - 1, 2**62):
                latest[(update.source, update.run.job_run_id)] = update
        except _UNREACHABLE as exc:
            raise self._unavailable("cannot read the runs", exc) from None
        # Every message up to the highest sequence read is reflected: the
        # consumer delivered the last message of every subject as of its
        # creation, then everything after that until nothing was pending.
        head = max(max((u.revision for u in latest.values()), default=0), state.last_seq)
        matches = compile_filter(flt)
        return sorted((u for u in latest.values() if matches(u)), key=lambda u: u.revision), head

    async def list_runs(
        self, flt: _svc.RunFilter | None, after: tuple[str, int] | None, limit: int
    ) -> list[_svc.RunUpdate]:
        """Latest states ordered by (source, job_run_id); reads every run's last message."""
        updates, _ = await self.snapshot(flt)
        keyed = sorted(((u.source, u.run.job_run_id), u) for u in updates)
        return [u for key, u in keyed if after is None or key > after][: max(limit, 0)]

    def head_revision(self) -> int:
        """The newest sequence this replica has followed (and told its listeners about)."""
        return self._head


def _tls_context(options: Mapping[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("tls_ca"))
    cert, key = options.get("tls_cert"), options.get("tls_key")
    if bool(cert) != bool(key):
        raise ConfigurationError("NATS store: give both tls_cert and tls_key, or neither")
    if cert and key:
        try:
            context.load_cert_chain(cert, key)
        except OSError as exc:
            raise ConfigurationError(f"NATS store: cannot read {exc.filename}: {exc.strerror}") from None
    return context
