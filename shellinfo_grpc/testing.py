"""A stand-in Cohesity cluster for tests: :class:`FakeCluster`.

``FakeCluster`` is a real HTTP server on a loopback address that answers the
parts of the cluster REST API v1 that a poller of protection runs uses, the way
a cluster answers them (see "Bridge a cluster" in the README):

* ``POST /irisservices/api/v1/public/accessTokens`` with JSON ``username``,
  ``password`` and ``domain`` (``LOCAL`` when absent) answers ``accessToken``,
  ``tokenType`` (``Bearer``) and ``privileges``; tokens expire after
  ``token_lifetime`` seconds of the fake's clock;
* ``GET /irisservices/api/v1/public/protectionRuns`` with ``jobId``,
  ``startTimeUsecs``, ``endTimeUsecs``, ``numRuns``, ``runTypes``,
  ``excludeTasks`` and ``onlyReturnShellInfo`` answers a JSON array of
  ``ProtectionRunInstance`` objects, grouped per job (jobs in id order) and
  newest first within a job, cut at ``numRuns``: so, as on a real cluster, a
  full answer drops the same trailing jobs on every poll;
* ``GET /irisservices/api/v1/public/protectionJobs`` lists the jobs.

Requests authenticate with ``Authorization: Bearer <token>`` or with an
``apiKey: KEY`` header (and, as on Helios, an optional ``accessClusterId``
header that must name this cluster). Errors come as the cluster sends them: a
JSON object with ``message`` and usually ``errorCode``; an expired token is 401
``{"message": "Token expired"}``, an unknown one 401 with ``errorCode``
``KStatusUnauthorized`` and "The access token is invalid.".

Runs progress over time: each has a timeline of ``(status, seconds after it
was queued)`` steps, read against the fake's own clock, which only moves when
the test calls :meth:`FakeCluster.advance` (or :meth:`FakeCluster.set_time`).
A run is listed once its queue time has come; it has an ``endTimeUsecs`` only
once its status is final. Any status spelling and any extra key may be given,
to play a newer cluster.

Faults are scripted: :meth:`~FakeCluster.fail_next` (401, 429 with
``Retry-After``, 500, ...), :meth:`~FakeCluster.slow_next` (answers that take
their time), :meth:`~FakeCluster.expire_tokens`. :attr:`~FakeCluster.requests`
is the log of every request answered (without secrets).

The server runs on an event loop in a thread of its own, so the same object
serves blocking tests (``with FakeCluster() as cluster:``) and asyncio ones
(``async with FakeCluster() as cluster:``); every method is thread-safe.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

from aiohttp import web

__all__ = [
    "API_PREFIX",
    "DEFAULT_TIMELINE",
    "FINAL_STATUSES",
    "FakeCluster",
    "RecordedRequest",
]

#: Where the v1 public API lives under a cluster's base URL.
API_PREFIX: Final = "/irisservices/api/v1/public"

#: Final statuses, after which a run has an end time and changes no more.
FINAL_STATUSES: Final = frozenset({"kCanceled", "kSuccess", "kFailure", "kWarning", "kMissed"})

#: A run that is queued, runs after a minute and succeeds after ten.
DEFAULT_TIMELINE: Final = (("kAccepted", 0.0), ("kRunning", 60.0), ("kSuccess", 600.0))

_USECS: Final = 1_000_000
_ENDPOINTS: Final = ("accessTokens", "protectionRuns", "protectionJobs")


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the fake answered, as the test may check it (no secrets).

    ``endpoint`` is the last path segment (``protectionRuns``, ...); ``query``
    the query parameters; ``auth`` how the request authenticated (``"token"``,
    ``"apiKey"``, ``"login"`` or ``"none"``); ``username`` the login's user
    name; ``status`` the HTTP status answered; ``time`` the fake clock's time
    and ``wall_time`` the real (monotonic) time when the request arrived.
    """

    method: str
    endpoint: str
    query: Mapping[str, str]
    auth: str
    access_cluster_id: str | None
    username: str | None
    status: int
    time: float
    wall_time: float


@dataclass(slots=True)
class _Fault:
    """A scripted misbehaviour for the next ``remaining`` matching requests."""

    endpoint: str | None  # None: any endpoint
    remaining: int
    status: int = 0  # 0: answer normally after the delay
    delay: float = 0.0
    retry_after: str | None = None
    body: Any = None

    def matches(self, endpoint: str) -> bool:
        return self.endpoint is None or self.endpoint == endpoint


@dataclass(slots=True)
class _Job:
    job_id: int
    name: str
    runs: list[_Run] = field(default_factory=list)


@dataclass(slots=True)
class _Run:
    job_id: int
    job_run_id: int
    queued_usecs: int
    run_type: str
    timeline: list[tuple[str, float]]
    error: str | None
    extra: dict[str, Any]

    def step(self, now_usecs: int) -> tuple[str, float] | None:
        """The (status, offset) in force at ``now_usecs``; None before the run is queued."""
        if now_usecs < self.queued_usecs:
            return None
        elapsed = (now_usecs - self.queued_usecs) / _USECS
        current = None
        for status, offset in self.timeline:
            if offset <= elapsed:
                current = (status, offset)
        return current

    def shell_info(self, now_usecs: int) -> dict[str, Any] | None:
        step = self.step(now_usecs)
        if step is None:
            return None
        status, offset = step
        info: dict[str, Any] = {
            "jobRunId": self.job_run_id,
            "startTimeUsecs": self.queued_usecs,
            "runType": self.run_type,
            "status": status,
        }
        if status in FINAL_STATUSES:
            info["endTimeUsecs"] = self.queued_usecs + round(offset * _USECS)
            if self.error is not None and status in ("kFailure", "kCanceled"):
                info["error"] = self.error
        info.update(self.extra)
        return info


def _error(
    status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    body: dict[str, Any] = {"message": message}
    if code is not None:
        body = {"errorCode": code, "message": message}
    return web.json_response(body, status=status, headers=headers)


class _BadQuery(Exception):
    """A query parameter the cluster would refuse (400)."""


def _int_param(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise _BadQuery(f"{name}: expected an integer, got {raw!r}") from None


def _bool_param(query: Mapping[str, str], name: str) -> bool:
    raw = query.get(name)
    if raw is None:
        return False
    if raw.lower() not in ("true", "false"):
        raise _BadQuery(f"{name}: expected true or false, got {raw!r}")
    return raw.lower() == "true"


class FakeCluster:
    """A scriptable stand-in for a Cohesity cluster's REST API v1 (see the module docstring).

    ``users`` maps user names to passwords for token login (domain ``LOCAL``
    unless ``domain`` says otherwise); ``api_keys`` are accepted in the
    ``apiKey`` header. ``token_lifetime`` is how long a token stays valid, in
    seconds of the fake clock, which starts at ``start_time`` (Unix seconds;
    the real time when not given). ``ssl_context`` serves HTTPS instead of
    HTTP. ``default_num_runs`` is how many runs a ``protectionRuns`` query
    without ``numRuns`` gets. ``max_window`` (seconds), when set, makes
    queries whose window reaches further back than that answer 500, as some
    clusters do for windows wider than about a week.
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        domain: str = "LOCAL",
        api_keys: Iterable[str] = (),
        token_lifetime: float = 24 * 3600.0,
        start_time: float | None = None,
        cluster_id: int = 8_123_456_789_012_345,
        cluster_incarnation_id: int = 1_650_000_000_000,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        default_num_runs: int = 1000,
        max_window: float | None = None,
    ) -> None:
        self._users = dict(users if users is not None else {"admin": "admin"})
        self._domain = domain
        self._api_keys = frozenset(api_keys)
        self._token_lifetime = token_lifetime
        self._now_usecs = round((time.time() if start_time is None else start_time) * _USECS)
        self.cluster_id = cluster_id
        self.cluster_incarnation_id = cluster_incarnation_id
        self._ssl = ssl_context
        self._host = host
        self._port = port
        self._default_num_runs = default_num_runs
        self._max_window = max_window
        self._lock = threading.Lock()
        self._jobs: dict[int, _Job] = {}
        self._runs: dict[int, _Run] = {}
        self._tokens: dict[str, int] = {}  # token -> expiry (fake usecs)
        self._faults: list[_Fault] = []
        self._log: list[RecordedRequest] = []
        self._job_ids = itertools.count(1)
        self._run_ids = itertools.count(1001)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._bound_port = 0

    # --- lifecycle -------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL to give a client (``http://127.0.0.1:PORT``); valid once started."""
        if not self._bound_port:
            raise RuntimeError("the fake cluster is not started")
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{self._host}:{self._bound_port}"

    @property
    def port(self) -> int:
        """The bound port; valid once started."""
        return self._bound_port

    def start(self) -> None:
        """Start serving, in a thread of its own; return once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("the fake cluster is already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_app())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._stop_app())
                loop.close()

        self._thread = threading.Thread(target=serve, name="FakeCluster", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    async def _start_app(self) -> None:
        app = web.Application()
        app.router.add_post(f"{API_PREFIX}/accessTokens", self._login)
        app.router.add_get(f"{API_PREFIX}/protectionRuns", self._protection_runs)
        app.router.add_get(f"{API_PREFIX}/protectionJobs", self._protection_jobs)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl)
        await site.start()
        self._runner = runner
        self._bound_port = int(runner.addresses[0][1])

    async def _stop_app(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def close(self) -> None:
        """Stop serving; requests in flight are dropped. Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = None
        self._loop = None
        self._bound_port = 0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.close)

    # --- the clock ----------------------------------------------------------------

    def time(self) -> float:
        """The fake clock, in Unix seconds."""
        with self._lock:
            return self._now_usecs / _USECS

    def now_usecs(self) -> int:
        """The fake clock, in Unix microseconds."""
        with self._lock:
            return self._now_usecs

    def advance(self, seconds: float) -> None:
        """Move the fake clock forward: runs progress, tokens age."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._now_usecs += round(seconds * _USECS)

    def set_time(self, unix_seconds: float) -> None:
        """Set the fake clock (forward only)."""
        with self._lock:
            target = round(unix_seconds * _USECS)
            if target < self._now_usecs:
                raise ValueError("the clock only moves forward")
            self._now_usecs = target

    # --- jobs and runs --------------------------------------------------------------

    def add_job(self, name: str, *, job_id: int | None = None) -> int:
        """Add a protection job; return its id."""
        with self._lock:
            number = next(self._job_ids) if job_id is None else job_id
            if number in self._jobs:
                raise ValueError(f"job {number} exists")
            self._jobs[number] = _Job(number, name)
            return number

    def rename_job(self, job_id: int, name: str) -> None:
        """Rename a job (a deleted job's name gets the ``_DELETED`` prefix on a cluster)."""
        with self._lock:
            self._jobs[job_id].name = name

    def add_run(
        self,
        job_id: int,
        *,
        start: float | None = None,
        run_type: str = "kRegular",
        timeline: Sequence[tuple[str, float]] = DEFAULT_TIMELINE,
        error: str | None = None,
        extra_keys: Mapping[str, Any] | None = None,
        job_run_id: int | None = None,
    ) -> int:
        """Add a run of ``job_id``, queued at ``start`` (Unix seconds; now when absent).

        ``timeline`` lists ``(status, seconds after start)`` steps in time
        order; the run is in the last step whose time has come. ``error`` is
        reported with a final kFailure or kCanceled. ``extra_keys`` go into the
        run's ``protectionShellInfo`` as they are (keys a newer cluster adds).
        Returns the run's ``jobRunId``.
        """
        steps = [(str(status), float(offset)) for status, offset in timeline]
        if not steps or any(b[1] < a[1] for a, b in itertools.pairwise(steps)):
            raise ValueError("timeline: give at least one step, in time order")
        with self._lock:
            job = self._jobs[job_id]
            number = next(self._run_ids) if job_run_id is None else job_run_id
            if number in self._runs:
                raise ValueError(f"run {number} exists")
            queued = self._now_usecs if start is None else round(start * _USECS)
            run = _Run(job_id, number, queued, run_type, steps, error, dict(extra_keys or {}))
            job.runs.append(run)
            self._runs[number] = run
            return number

    def set_status(self, job_run_id: int, status: str, *, error: str | None = None) -> None:
        """Move a run to ``status`` now (after the steps of its timeline that have come)."""
        with self._lock:
            run = self._runs[job_run_id]
            elapsed = max((self._now_usecs - run.queued_usecs) / _USECS, 0.0)
            run.timeline = [step for step in run.timeline if step[1] <= elapsed]
            run.timeline.append((status, elapsed))
            if error is not None:
                run.error = error

    def shell_info(self, job_run_id: int) -> dict[str, Any] | None:
        """The run's ``protectionShellInfo`` as the fake would answer it now (None before it is queued)."""
        with self._lock:
            return self._runs[job_run_id].shell_info(self._now_usecs)

    def job_of(self, job_run_id: int) -> dict[str, Any]:
        """The job keys (``jobId``, ``jobName``, ``jobUid``) the fake answers beside the run now."""
        with self._lock:
            job = self._jobs[self._runs[job_run_id].job_id]
            return {"jobId": job.job_id, "jobName": job.name, "jobUid": self._uid(job.job_id)}

    # --- faults ---------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        *,
        times: int = 1,
        endpoint: str | None = None,
        retry_after: float | str | None = None,
        body: Any = None,
    ) -> None:
        """Answer the next ``times`` requests (to ``endpoint``, or any) with HTTP ``status``.

        ``retry_after`` is sent as the ``Retry-After`` header (seconds, or any
        text such as an HTTP date). ``body`` is the JSON body; by default the
        one a cluster sends for that status.
        """
        if endpoint is not None and endpoint not in _ENDPOINTS:
            raise ValueError(f"endpoint: expected one of {', '.join(_ENDPOINTS)}")
        header = None
        if retry_after is not None:
            header = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
        with self._lock:
            self._faults.append(_Fault(endpoint, times, status=status, retry_after=header, body=body))

    def slow_next(self, seconds: float, *, times: int = 1, endpoint: str | None = None) -> None:
        """Make the next ``times`` requests (to ``endpoint``, or any) wait ``seconds`` (real time) first."""
        if endpoint is not None and endpoint not in _ENDPOINTS:
            raise ValueError(f"endpoint: expected one of {', '.join(_ENDPOINTS)}")
        with self._lock:
            self._faults.append(_Fault(endpoint, times, delay=seconds))

    def clear_faults(self) -> None:
        """Forget the faults not yet used up."""
        with self._lock:
            self._faults.clear()

    def expire_tokens(self) -> None:
        """Make every token issued so far expired: its next use is 401 ``Token expired``."""
        with self._lock:
            for token in self._tokens:
                self._tokens[token] = self._now_usecs

    def set_password(self, username: str, password: str) -> None:
        """Change (or add) a user's password; tokens issued before stay valid."""
        with self._lock:
            self._users[username] = password

    # --- the request log ---------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request answered so far, oldest first (a copy)."""
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        """Empty the request log."""
        with self._lock:
            self._log.clear()

    # --- the handlers -------------------------------------------------------------------

    async def _fault(self, endpoint: str) -> _Fault | None:
        with self._lock:
            fault = next((f for f in self._faults if f.matches(endpoint)), None)
            if fault is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        return fault if fault is not None and fault.status else None

    def _record(self, request: web.Request, endpoint: str, auth: str, status: int, username: str | None = None) -> None:
        with self._lock:
            self._log.append(
                RecordedRequest(
                    method=request.method,
                    endpoint=endpoint,
                    query=dict(request.query),
                    auth=auth,
                    access_cluster_id=request.headers.get("accessClusterId"),
                    username=username,
                    status=status,
                    time=self._now_usecs / _USECS,
                    wall_time=time.monotonic(),
                )
            )

    @staticmethod
    def _fault_response(fault: _Fault) -> web.Response:
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
        if fault.body is not None:
            return web.json_response(fault.body, status=fault.status, headers=headers)
        if fault.status == 401:
            return _error(401, "Token expired", headers=headers)
        if fault.status == 429:
            return _error(429, "Too many requests, retry later.", "KStatusTooManyRequests", headers)
        if fault.status >= 500:
            return _error(fault.status, "Internal server error.", "KInternalError", headers)
        return _error(fault.status, "Request refused.", "KStatusBadRequest", headers)

    async def _login(self, request: web.Request) -> web.Response:
        fault = await self._fault("accessTokens")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        username = body.get("username") if isinstance(body, dict) else None
        name = username if isinstance(username, str) else None
        if fault is not None:
            response = self._fault_response(fault)
        elif not isinstance(body, dict):
            response = _error(400, "The request body is not a JSON object.", "KStatusBadRequest")
        else:
            password = body.get("password")
            domain = body.get("domain") or "LOCAL"
            with self._lock:
                valid = name is not None and self._users.get(name) == password and domain == self._domain
                if valid:
                    token = secrets.token_urlsafe(24)
                    self._tokens[token] = self._now_usecs + round(self._token_lifetime * _USECS)
            if valid:
                privileges = ["kProtectionView", "kClusterView"]
                response = web.json_response(
                    {"accessToken": token, "tokenType": "Bearer", "privileges": privileges}, status=201
                )
            else:
                response = _error(401, "Invalid username or password.", "KStatusUnauthorized")
        self._record(request, "accessTokens", "login", response.status, name)
        return response

    def _authenticate(self, request: web.Request) -> tuple[str, web.Response | None]:
        """How the request authenticates, and the refusal if it does not."""
        headers = request.headers
        api_key = headers.get("apiKey")
        if api_key is not None:
            if api_key not in self._api_keys:
                return "apiKey", _error(401, "The API key is invalid.", "KStatusUnauthorized")
            target = headers.get("accessClusterId")
            if target is not None and target != str(self.cluster_id):
                return "apiKey", _error(404, f"Cluster {target} is not registered.", "KStatusNotFound")
            return "apiKey", None
        authorization = headers.get("Authorization")
        if authorization is None:
            return "none", _error(401, "Authentication required.", "KStatusUnauthorized")
        kind, _, token = authorization.partition(" ")
        with self._lock:
            expiry = self._tokens.get(token) if kind == "Bearer" else None
            now = self._now_usecs
        if expiry is None:
            return "token", _error(401, "The access token is invalid.", "KStatusUnauthorized")
        if expiry <= now:
            return "token", _error(401, "Token expired")
        return "token", None

    async def _authorized(
        self, request: web.Request, endpoint: str, answer: Callable[[], web.Response]
    ) -> web.Response:
        """An endpoint's answer: an injected fault first, then a refused credential, else ``answer()``."""
        fault = await self._fault(endpoint)
        auth, refusal = self._authenticate(request)
        if fault is not None:
            response = self._fault_response(fault)
        elif refusal is not None:
            response = refusal
        else:
            try:
                response = answer()
            except _BadQuery as exc:
                response = _error(400, str(exc), "KStatusBadRequest")
        self._record(request, endpoint, auth, response.status)
        return response

    async def _protection_runs(self, request: web.Request) -> web.Response:
        return await self._authorized(request, "protectionRuns", lambda: self._runs_answer(request.query))

    def _runs_answer(self, query: Mapping[str, str]) -> web.Response:
        job_filter = _int_param(query, "jobId")
        start = _int_param(query, "startTimeUsecs")
        end = _int_param(query, "endTimeUsecs")
        num_runs = _int_param(query, "numRuns")
        shell_only = _bool_param(query, "onlyReturnShellInfo")
        exclude_tasks = _bool_param(query, "excludeTasks")
        run_types = frozenset(filter(None, query.get("runTypes", "").split(",")))
        limit = self._default_num_runs if num_runs is None else num_runs
        if limit < 0:
            raise _BadQuery("numRuns: must not be negative")
        with self._lock:
            now = self._now_usecs
            if self._max_window is not None and (start is None or now - start > self._max_window * _USECS):
                return _error(500, "Query timed out: the time range is too wide.", "KInternalError")
            out: list[dict[str, Any]] = []
            for job_id in sorted(self._jobs):
                if job_filter is not None and job_id != job_filter:
                    continue
                job = self._jobs[job_id]
                for run in sorted(job.runs, key=lambda r: (r.queued_usecs, r.job_run_id), reverse=True):
                    if len(out) >= limit:
                        break
                    info = run.shell_info(now)
                    if info is None or (start is not None and run.queued_usecs < start):
                        continue
                    if end is not None and not ("endTimeUsecs" in info and info["endTimeUsecs"] <= end):
                        continue
                    if run_types and run.run_type not in run_types:
                        continue
                    out.append(self._instance(job, info, shell_only, exclude_tasks))
        return web.Response(body=json.dumps(out).encode(), content_type="application/json")

    def _uid(self, job_id: int) -> dict[str, int]:
        return {"clusterId": self.cluster_id, "clusterIncarnationId": self.cluster_incarnation_id, "id": job_id}

    def _instance(self, job: _Job, info: dict[str, Any], shell_only: bool, exclude_tasks: bool) -> dict[str, Any]:
        instance: dict[str, Any] = {"jobId": job.job_id, "jobName": job.name, "jobUid": self._uid(job.job_id)}
        instance["viewBoxId"] = 5
        if shell_only:
            instance["protectionShellInfo"] = info
            return instance
        stats = {key: info[key] for key in ("startTimeUsecs", "endTimeUsecs") if key in info}
        backup: dict[str, Any] = {
            "jobRunId": info["jobRunId"],
            "runType": info["runType"],
            "status": info["status"],
            "stats": stats,
        }
        if "error" in info:
            backup["error"] = info["error"]
        if not exclude_tasks:
            backup["sourceBackupStatus"] = []
        instance["backupRun"] = backup
        instance["copyRun"] = []
        return instance

    async def _protection_jobs(self, request: web.Request) -> web.Response:
        return await self._authorized(request, "protectionJobs", self._jobs_answer)

    def _jobs_answer(self) -> web.Response:
        with self._lock:
            jobs = [
                {
                    "id": job.job_id,
                    "name": job.name,
                    "uid": self._uid(job.job_id),
                    "environment": "kVMware",
                    "viewBoxId": 5,
                }
                for job in sorted(self._jobs.values(), key=lambda j: j.job_id)
            ]
        return web.json_response(jobs)
